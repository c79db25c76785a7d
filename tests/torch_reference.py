"""Helpers shared by the tests that compare against real PyTorch models."""
import torch


def randomise_batchnorm(module: torch.nn.Module, seed: int) -> None:
  """Random affine and running statistics in every BatchNorm2d, so BN conversion errors cannot hide
  behind the identity defaults (weight 1, bias 0, mean 0, var 1)."""
  g = torch.Generator().manual_seed(seed)
  for m in module.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      n = m.num_features
      with torch.no_grad():
        m.weight.copy_(1 + 0.2 * torch.randn(n, generator=g))
        m.bias.copy_(0.1 * torch.randn(n, generator=g))
        m.running_mean.copy_(0.1 * torch.randn(n, generator=g))
        m.running_var.copy_(0.5 + torch.rand(n, generator=g))
