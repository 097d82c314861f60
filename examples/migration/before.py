"""A stock DeepSpeed pipeline job: a small CNN on synthetic 10-class images (stands in for CIFAR-10).

    deepspeed --num_gpus 3 examples/migration/before.py --deepspeed_config examples/migration/ds_config.json
"""
import argparse

import deepspeed
import torch
from deepspeed.pipe import LayerSpec, PipelineModule
from torch import nn


class Images(torch.utils.data.Dataset):
    def __init__(self, n=1024):
        g = torch.Generator().manual_seed(0)
        self.y = torch.randint(0, 10, (n,), generator=g)
        self.x = torch.randn(n, 3, 32, 32, generator=g) + 0.2 * self.y.view(-1, 1, 1, 1)

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], self.y[i]


def layers():
    return [LayerSpec(nn.Conv2d, 3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            LayerSpec(nn.Conv2d, 32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
            LayerSpec(nn.Linear, 64 * 8 * 8, 256), nn.ReLU(), LayerSpec(nn.Linear, 256, 10)]


parser = argparse.ArgumentParser()
parser.add_argument("--local_rank", type=int, default=0)
parser.add_argument("--steps", type=int, default=30)
parser = deepspeed.add_config_arguments(parser)
args = parser.parse_args()
deepspeed.init_distributed()
torch.manual_seed(0)
model = PipelineModule(layers=layers(), num_stages=3, loss_fn=nn.CrossEntropyLoss())
engine, _, _, _ = deepspeed.initialize(args=args, model=model, training_data=Images(),
                                       model_parameters=[p for p in model.parameters() if p.requires_grad])
for step in range(args.steps):
    engine.train_batch()
