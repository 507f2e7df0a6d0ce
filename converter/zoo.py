"""Reference Keras models, usable as SPECs such as ``converter.zoo:mnist_cnn``."""

from __future__ import annotations

import keras


def mnist_cnn(num_classes: int = 10) -> keras.Model:
    """The CNN of McMahan et al. 2017: two 5x5 convolutions (32, 64) each followed
    by 2x2 max-pooling, Dense 512 ReLU, softmax output; 1,663,370 parameters."""
    model = keras.Sequential(
        [
            keras.Input((28, 28, 1)),
            keras.layers.Conv2D(32, 5, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Conv2D(64, 5, padding="same", activation="relu"),
            keras.layers.MaxPooling2D(),
            keras.layers.Flatten(),
            keras.layers.Dense(512, activation="relu"),
            keras.layers.Dense(num_classes, activation="softmax"),
        ],
        name="mnist_cnn",
    )
    model.compile(loss="sparse_categorical_crossentropy", optimizer=keras.optimizers.SGD(0.02))
    return model


def tabular_binary(num_features: int = 8) -> keras.Model:
    """A small Dense-only binary classifier for tabular data (sigmoid output)."""
    model = keras.Sequential(
        [
            keras.Input((num_features,)),
            keras.layers.Dense(32, activation="relu"),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.Dense(1, activation="sigmoid"),
        ],
        name="tabular_binary",
    )
    model.compile(loss="binary_crossentropy", optimizer=keras.optimizers.Adam(0.01))
    return model
