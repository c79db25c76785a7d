"""Helpers shared by the tests that compare against real PyTorch models.

Initialisers leave many parameters at special values (timm: every ViT Linear bias exactly 0, LayerNorm
1/0; torchvision: BatchNorm 1/0 and running statistics 0/1), and a converter that drops or transposes
such a parameter still matches at init. These helpers give every parameter and running statistic a
random, non-trivial value before a comparison. `write_simsiam_checkpoint` and `write_dino_checkpoint`
save random models in the layouts of the paper's released victims (for the converter's tests and the
rehearsal of the README's commands).
"""
import argparse

import timm
import torch
import torchvision


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


def randomise_all(module: torch.nn.Module, seed: int) -> None:
  """Every floating parameter and BatchNorm running statistic of `module` gets a fresh random value.

  Linear / Conv weights ~ N(0, 1/fan_in) (activations keep their scale through deep stacks), their
  biases ~ 0.1 N(0, 1); norm layers' weights 1 + 0.2 N(0, 1) and biases 0.1 N(0, 1); any other
  parameter (ViT position embedding, CLS token) 0.5 N(0, 1). Raises if a parameter was left untouched,
  so a new module type cannot silently keep its init.
  """
  g = torch.Generator().manual_seed(seed)
  done = set()

  def fill(p, values):
    with torch.no_grad():
      p.copy_(values.to(p.dtype))
    done.add(id(p))

  randomise_batchnorm(module, seed + 1)
  for m in module.modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      done.update(id(p) for p in (m.weight, m.bias) if p is not None)
  for m in module.modules():
    if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)):
      fan_in = m.weight[0].numel()
      fill(m.weight, torch.randn(m.weight.shape, generator=g) / fan_in ** 0.5)
      if m.bias is not None:
        fill(m.bias, 0.1 * torch.randn(m.bias.shape, generator=g))
    elif isinstance(m, (torch.nn.LayerNorm, torch.nn.BatchNorm1d)) and m.weight is not None:
      fill(m.weight, 1 + 0.2 * torch.randn(m.weight.shape, generator=g))
      fill(m.bias, 0.1 * torch.randn(m.bias.shape, generator=g))
  for _, p in module.named_parameters():
    if id(p) not in done:
      fill(p, 0.5 * torch.randn(p.shape, generator=g))
  untouched = [n for n, p in module.named_parameters() if id(p) not in done]
  assert not untouched, untouched


def assert_no_default_values(module: torch.nn.Module) -> None:
  """Fails if any parameter tensor is constant (an all-zero bias, an all-one LayerNorm scale)."""
  constant = [n for n, p in module.named_parameters() if p.numel() > 1 and float(p.detach().std()) == 0.0]
  assert not constant, f"parameters left at a constant value: {constant}"


# ----------------------------------------------------------------------------------------------------
# torchvision's own samplers, fed with given uniform draws
# ----------------------------------------------------------------------------------------------------
class _ScriptedTorch:
  """Stands in for the `torch` module inside torchvision.transforms.transforms, so torchvision's own
  sampling code runs unchanged on draws we choose: `torch.empty(1).uniform_(lo, hi)` returns
  lo + u * (hi - lo) for the next u of `uniforms` (float64), `torch.randint(low, high)` returns
  low + floor(u * (high - low)) with u = randint_u(number of uniforms used so far), `torch.randperm(n)`
  returns `perm`. Everything else is real torch."""

  def __init__(self, uniforms, randint_u=None, perm=None):
    self.uniforms = [float(u) for u in uniforms]
    self.used = 0
    self.randint_calls = 0
    self.randint_u = randint_u
    self.perm = perm

  def __getattr__(self, name):
    return getattr(torch, name)

  def empty(self, *shape, **kwargs):
    del shape, kwargs
    owner = self

    class _Draw:

      def uniform_(self, lo, hi):
        u = owner.uniforms[owner.used]
        owner.used += 1
        return torch.tensor([float(lo) + u * (float(hi) - float(lo))], dtype=torch.float64)
    return _Draw()

  def randint(self, low, high, size=None, **kwargs):
    del size, kwargs
    u = self.randint_u(self.used, self.randint_calls)
    self.randint_calls += 1
    return torch.tensor([int(low) + int(u * (int(high) - int(low)))])

  def randperm(self, n, **kwargs):
    del kwargs
    assert len(self.perm) == n
    return torch.tensor(list(self.perm))


def _with_scripted_torch(scripted, fn):
  from unittest import mock  # pylint: disable=g-import-not-at-top
  import torchvision.transforms.transforms as tv_transforms  # pylint: disable=g-import-not-at-top
  with mock.patch.object(tv_transforms, "torch", scripted):
    return fn(tv_transforms)


def torchvision_rrc_params(height, width, scale, ratio, u_area, u_log_ratio, u_top, u_left):
  """torchvision's RandomResizedCrop.get_params (its real code) where attempt k draws its area fraction
  from u_area[k] and its log aspect ratio from u_log_ratio[k] and, if its box fits, its offsets from
  u_top[k] and u_left[k] (torch.randint(0, n) -> floor(u * n)). Returns (top, left, h, w)."""
  uniforms = [u for pair in zip(u_area, u_log_ratio) for u in pair]

  def randint_u(used, call):  # `used` uniforms so far: the box of attempt used // 2 - 1 fitted
    attempt = used // 2 - 1
    return (u_top if call == 0 else u_left)[attempt]

  scripted = _ScriptedTorch(uniforms, randint_u)
  return _with_scripted_torch(scripted, lambda tv: tv.RandomResizedCrop.get_params(
      torch.zeros(1, height, width), list(scale), list(ratio)))


def torchvision_color_jitter(strength, perm, uniforms):
  """image -> torchvision's ColorJitter(*strength) applied with op order `perm` and the uniforms
  (brightness, contrast, saturation, hue) in [0, 1) in place of torch's draws."""
  def apply(image):
    scripted = _ScriptedTorch(uniforms, perm=perm)
    return _with_scripted_torch(scripted, lambda tv: tv.ColorJitter(*strength)(image))
  return apply


def torchvision_gaussian_blur(kernel_size, sigma_range, u):
  """image -> torchvision's GaussianBlur(kernel_size, sigma_range) with its sigma drawn from u."""
  def apply(image):
    scripted = _ScriptedTorch([u])
    return _with_scripted_torch(scripted, lambda tv: tv.GaussianBlur(kernel_size, sigma_range)(image))
  return apply


# ----------------------------------------------------------------------------------------------------
# Random models saved like the paper's released victims
# ----------------------------------------------------------------------------------------------------
def simsiam_model(dim=2048, pred_dim=512):
  """SimSiam's builder: a resnet50 whose fc becomes the 3-layer projector, plus the predictor."""
  torch.manual_seed(0)
  encoder = torchvision.models.resnet50(num_classes=dim, zero_init_residual=True)
  prev_dim = encoder.fc.weight.shape[1]
  encoder.fc = torch.nn.Sequential(
      torch.nn.Linear(prev_dim, prev_dim, bias=False), torch.nn.BatchNorm1d(prev_dim),
      torch.nn.ReLU(inplace=True), torch.nn.Linear(prev_dim, prev_dim, bias=False),
      torch.nn.BatchNorm1d(prev_dim), torch.nn.ReLU(inplace=True), encoder.fc,
      torch.nn.BatchNorm1d(dim, affine=False))
  predictor = torch.nn.Sequential(
      torch.nn.Linear(dim, pred_dim, bias=False), torch.nn.BatchNorm1d(pred_dim),
      torch.nn.ReLU(inplace=True), torch.nn.Linear(pred_dim, dim))
  randomise_batchnorm(encoder, seed=1)
  for m in encoder.modules():  # a trained checkpoint's counter (the converter must ignore it)
    if isinstance(m, torch.nn.BatchNorm2d):
      m.num_batches_tracked.fill_(12345)

  class SimSiam(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.encoder, self.predictor = encoder, predictor

  return torch.nn.DataParallel(SimSiam())  # keys get SimSiam's `module.` prefix


def write_simsiam_checkpoint(path) -> torch.nn.Module:
  """A random SimSiam ResNet-50 saved like SimSiam's checkpoint_0099.pth.tar; returns the model."""
  model = simsiam_model()
  optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
  for p in list(model.parameters())[:10]:  # a few momentum buffers, as after training
    optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
  torch.save({"epoch": 100, "arch": "resnet50", "state_dict": model.state_dict(),
              "optimizer": optimizer.state_dict()}, path)
  return model


def vit_small(seed):
  torch.manual_seed(seed)
  vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()
  # Every parameter random: timm inits all Linear biases (qkv, proj, fc1, fc2) to 0 and LayerNorms to
  # 1/0, so a converter that dropped a bias would still match at init (real DINO weights have them).
  randomise_all(vit, seed + 100)
  assert_no_default_values(vit)
  return vit


def dino_head_state(prefix, seed, out_dim=1024):
  # DINOHead: 3-layer MLP + weight-normed last layer (65536 prototypes in DINO; fewer here, same keys).
  g = torch.Generator().manual_seed(seed)
  shapes = {"mlp.0.weight": (2048, 384), "mlp.0.bias": (2048,), "mlp.2.weight": (2048, 2048),
            "mlp.2.bias": (2048,), "mlp.4.weight": (256, 2048), "mlp.4.bias": (256,),
            "last_layer.weight_g": (out_dim, 1), "last_layer.weight_v": (out_dim, 256)}
  return {prefix + k: torch.randn(s, generator=g) for k, s in shapes.items()}


def write_dino_checkpoint(path):
  """Random ViT-S/16 teacher and student saved like dino_deitsmall16_pretrain_full_checkpoint.pth;
  returns (teacher, student) (timm ViTs: DINO's architecture and key names)."""
  teacher, student = vit_small(0), vit_small(1)
  student_sd = {"module.backbone." + k: v for k, v in student.state_dict().items()}
  student_sd.update(dino_head_state("module.head.", 2))
  teacher_sd = {"backbone." + k: v for k, v in teacher.state_dict().items()}
  teacher_sd.update(dino_head_state("head.", 3))
  optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
  args = argparse.Namespace(arch="vit_small", patch_size=16, out_dim=65536, norm_last_layer=False,
                            lr=0.0005, epochs=800, output_dir="/checkpoint/dino", use_fp16=True)
  torch.save({"student": student_sd, "teacher": teacher_sd, "optimizer": optimizer.state_dict(),
              "epoch": 800, "args": args, "dino_loss": {"center": torch.zeros(1, 65536)}}, path)
  return teacher, student
