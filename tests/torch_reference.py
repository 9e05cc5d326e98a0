"""Small PyTorch reference modules written for the tests (timm is kept out of this project)."""
import torch
from torch import nn


class TorchBlock(nn.Module):
  def __init__(self, dim, heads, mlp):
    super().__init__()
    self.heads = heads
    self.norm1 = nn.LayerNorm(dim, eps=1e-6)
    self.attn = nn.Module()
    self.attn.qkv = nn.Linear(dim, 3 * dim)
    self.attn.proj = nn.Linear(dim, dim)
    self.norm2 = nn.LayerNorm(dim, eps=1e-6)
    self.mlp = nn.Module()
    self.mlp.fc1 = nn.Linear(dim, mlp)
    self.mlp.fc2 = nn.Linear(mlp, dim)

  def forward(self, x):
    b, n, d = x.shape
    qkv = self.attn.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    a = (q @ k.transpose(-2, -1)) * (d // self.heads) ** -0.5
    out = (a.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
    x = x + self.attn.proj(out)
    return x + self.mlp.fc2(nn.functional.gelu(self.mlp.fc1(self.norm2(x))))


class TorchViT(nn.Module):
  """timm/MAE ViT: patch embedding, class token, absolute positions, pre-LN blocks, final norm, optional proj."""

  def __init__(self, image_size=32, patch=16, dim=48, depth=2, heads=4, mlp=192, proj_dim=None, classes=2):
    super().__init__()
    self.patch_embed = nn.Module()
    self.patch_embed.proj = nn.Conv2d(3, dim, patch, patch)
    self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
    self.pos_embed = nn.Parameter(torch.randn(1, 1 + (image_size // patch) ** 2, dim) * 0.02)
    self.blocks = nn.ModuleList([TorchBlock(dim, heads, mlp) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=1e-6)
    self.head = nn.Linear(dim, classes)
    self.proj = nn.Linear(dim, proj_dim) if proj_dim else None
    for p in self.parameters():  # Non-trivial LayerNorm affine parameters too.
      with torch.no_grad():
        p.add_(torch.randn_like(p) * 0.05)

  def forward(self, images, final_norm=True):
    x = self.patch_embed.proj(images).flatten(2).transpose(1, 2)
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
    for block in self.blocks:
      x = block(x)
    if final_norm:
      x = self.norm(x)
    return self.proj(x) if self.proj is not None else x
