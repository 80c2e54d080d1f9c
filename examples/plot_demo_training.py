"""
Train a small CNN on handwritten digits
=======================================

The network of ``python -m conv2d demo`` (conv 3x3 -> relu -> max-pool -> conv 3x3 -> relu ->
max-pool -> dense -> softmax, built from :class:`conv2d.ConvolutionLayer` and :mod:`conv2d.nn`),
trained for two epochs on scikit-learn's 1,797 handwritten 8x8 digits with plain SGD. We plot the loss
of every mini-batch and the first layer's learned filters. Needs ``conv2d[demo]``.
"""

import matplotlib.pyplot as plt
import numpy as np

import conv2d
from conv2d import nn
from conv2d.tools import demo

# %%
# The data and the network
# ------------------------
# :func:`conv2d.tools.demo.load_digits` splits the digits into 80% training and 20% test images, scaled to
# [0, 1], on the host. :func:`conv2d.tools.demo.build_network` builds the demo's network on a backend.

backend = conv2d.get_backend()  # CONV2D_BACKEND, else NumPy
data = demo.load_digits(seed=0)
network = demo.build_network(backend, seed=0)
train_x = backend.asarray(data.train_x, dtype="float32")
train_y = backend.asarray(data.train_y)
test_x = backend.asarray(data.test_x, dtype="float32")
test_y = backend.asarray(data.test_y)
print(f"{train_x.shape[0]} training images, {test_x.shape[0]} test images, backend {backend.spec}")
for number, layer in enumerate(network.layers):
    print(number, type(layer).__name__)

# %%
# Training
# --------
# Each mini-batch: the forward pass, the loss and its gradient, then ``backwardpass``, which steps
# every layer's parameters by SGD and returns the gradient with respect to the batch.

epochs, batch_size, lr = 2, 32, 0.2
rng = np.random.default_rng(0)
losses = []
for epoch in range(epochs):
    order = rng.permutation(train_x.shape[0])
    for start in range(0, len(order), batch_size):
        index = backend.asarray(order[start : start + batch_size].astype(np.int32))
        x = backend.xp.take(train_x, index, axis=0)
        y = backend.xp.take(train_y, index, axis=0)
        loss, grad = nn.softmax_cross_entropy(network.forwardpass(x), y)
        network.backwardpass(lr, x, grad)
        losses.append(float(loss))
    test_loss, test_accuracy = demo.evaluate(network, test_x, test_y)
    print(f"epoch {epoch + 1}: test loss {test_loss:.3f}, test accuracy {test_accuracy:.1%}")

# %%
# The loss of each mini-batch
# ---------------------------

fig, ax = plt.subplots(figsize=(7, 3.5), layout="constrained")
steps = np.arange(1, len(losses) + 1)
ax.plot(steps, losses, lw=1, alpha=0.5, label="mini-batch")
window = 10
ax.plot(steps[window - 1 :], np.convolve(losses, np.ones(window) / window, mode="valid"), lw=2,
        label=f"mean of {window}")
ax.set(xlabel="step", ylabel="cross-entropy", yscale="log",
       title=f"training loss ({epochs} epochs; test accuracy {test_accuracy:.1%})")
ax.grid(alpha=0.3)
ax.legend()

# %%
# The first layer's filters
# -------------------------
# ``weights`` is an array of the backend; ``to_numpy`` brings it to the host for plotting.

filters = backend.to_numpy(network.layers[0].weights)[:, 0]  # (filters, 3, 3): one input channel
limit = float(np.abs(filters).max())
fig, axes = plt.subplots(2, len(filters) // 2, figsize=(8, 2.6), layout="constrained")
for number, ax in enumerate(axes.flat):
    image = ax.imshow(filters[number], cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set(xticks=[], yticks=[], title=str(number))
fig.colorbar(image, ax=axes, shrink=0.9, label="weight")
fig.suptitle("first layer's learned 3x3 filters")
plt.show()
