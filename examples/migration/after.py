"""The same job with interlocking backpropagation: an aux head per stage boundary, sized from the stage's output.

    deepspeed --num_gpus 3 examples/migration/after.py --deepspeed_config examples/migration/ds_config.json
"""
import argparse

import deepspeed
import torch
from deepspeed.pipe import LayerSpec
from torch import nn

from ds_interlock import InterlockingPipelineModule, heads, initialize


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
model = InterlockingPipelineModule(layers=layers(), num_stages=3, loss_fn=nn.CrossEntropyLoss(),
                                   aux_head=heads.classifier(10))
engine, _, _, _ = initialize(args=args, model=model, training_data=Images(),
                             model_parameters=[p for p in model.parameters() if p.requires_grad])
for step in range(args.steps):
    engine.train_batch()
