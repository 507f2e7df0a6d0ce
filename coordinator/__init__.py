"""litefed coordinator: runs federated rounds over MQTT (see issue 3)."""
