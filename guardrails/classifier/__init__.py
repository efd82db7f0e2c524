"""The trained input classifier: a multilingual sentence encoder, a small head per category, and the
data and commands that train and measure it."""
