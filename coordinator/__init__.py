"""litefed coordinator: runs federated rounds over MQTT, or simulates them (docs/architecture.md)."""
