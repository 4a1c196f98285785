"""The seed workloads in TensorFlow/Keras (Keras 3 models, eager steps, tf.data loaders)."""
