import torch
from torch import nn

from riemfip.applications.classifiers import accuracy, train_classifier
from riemfip.data import mnist_subset, split_tasks
from riemfip.optim import FIP

old, new = split_tasks(mnist_subset(), [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]])
net = nn.Sequential(nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
train_classifier(net, old.x_train, old.y_train, steps=300)

opt = FIP(
    net.parameters(), model=net, anchor_inputs=old.x_train[:250]
)  # keep these outputs
for _ in range(200):
    idx = torch.randint(len(new.x_train), (64,))
    opt.zero_grad()
    nn.functional.cross_entropy(net(new.x_train[idx]), new.y_train[idx]).backward()
    opt.step()
print(f"digits 0-4: {accuracy(net, old.x_test, old.y_test):.1%}")
print(f"digits 5-9: {accuracy(net, new.x_test, new.y_test):.1%}")
print(opt.last_info[0].drift)  # held-out anchor drift: divergence and arg-max agreement
