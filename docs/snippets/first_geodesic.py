from torch import nn

from manifolds import PullbackMetric, WeightSpace
from riemfip.applications.classifiers import train_classifier
from riemfip.data import mnist_subset

data = mnist_subset()  # 4,000 + 1,000 MNIST images, offline
net = nn.Sequential(nn.Linear(784, 32), nn.Tanh(), nn.Linear(32, 10))
train_classifier(net, data.x_train, data.y_train, steps=300)

metric = PullbackMetric.from_module(
    net, data.x_train[:25], output_metric="fisher", damping=1e-3
)
space = WeightSpace(metric)  # a geoopt.Manifold on flat weights
w0 = metric.module.flatten()  # the trained weights as one vector
v0 = space.egrad2rgrad(w0, -w0)  # natural gradient of -|w|^2/2: toward smaller weights
path = space.geodesic(
    w0, v0 / space.norm(w0, v0), speeds=True
)  # unit speed, t in [0, 1]
print(path.status.name, f"length {path.length:.4f}, speed drift {path.speed_drift:.1e}")
