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


# ---------------------------------------------------------------------------------------------------------
# RetFiner as the reference bundles' README defines it, in PyTorch: the same state_dict keys as the original's
# Lightning checkpoint (less the `model.` prefix), so that a bundle's model.ckpt loads into it.

class TorchBertAttention(nn.Module):
  """BERT's `attention` / `crossattention`: self.{query,key,value}, output.{dense,LayerNorm} (post-LN)."""

  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.self = nn.Module()
    self.self.query, self.self.key, self.self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
    self.output = nn.Module()
    self.output.dense = nn.Linear(dim, dim)
    self.output.LayerNorm = nn.LayerNorm(dim, eps=1e-12)

  def forward(self, x, source, bias=None):
    b, n, d = x.shape
    split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, d // self.heads).transpose(1, 2)
    q, k, v = split(self.self.query(x)), split(self.self.key(source)), split(self.self.value(source))
    scores = q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5
    if bias is not None:
      scores = scores + bias
    context = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
    return self.output.LayerNorm(x + self.output.dense(context))


class TorchBertLayer(nn.Module):
  def __init__(self, dim, heads, intermediate):
    super().__init__()
    self.attention = TorchBertAttention(dim, heads)
    self.crossattention = TorchBertAttention(dim, heads)
    self.intermediate = nn.Module()
    self.intermediate.dense = nn.Linear(dim, intermediate)
    self.output = nn.Module()
    self.output.dense = nn.Linear(intermediate, dim)
    self.output.LayerNorm = nn.LayerNorm(dim, eps=1e-12)

  def forward(self, x, bias, image_tokens=None):
    x = self.attention(x, x, bias)
    if image_tokens is not None:
      x = self.crossattention(x, image_tokens)
    return self.output.LayerNorm(x + self.output.dense(nn.functional.gelu(self.intermediate.dense(x))))


class TorchRetFiner(nn.Module):
  """vision_encoder (timm ViT + proj), multimodal_encoder (BERT with cross-attention, tied MLM head),
  contra_head_{v,t}, itm_head; eval mode throughout (no dropout), as the bundles were computed."""

  def __init__(self, c):
    super().__init__()
    self.vision_encoder = TorchViT(c["image_size"], c["patch_size"], c["vision_dim"], c["vision_depth"],
                                   c["vision_heads"], c.get("vision_mlp_dim", 4 * c["vision_dim"]),
                                   proj_dim=c["text_dim"] if c.get("vision_projection", True) else None)
    d = c["text_dim"]
    enc = self.multimodal_encoder = nn.Module()
    enc.bert = nn.Module()
    emb = enc.bert.embeddings = nn.Module()
    emb.word_embeddings = nn.Embedding(c["vocab_size"], d)
    emb.position_embeddings = nn.Embedding(c["max_position_embeddings"], d)
    emb.token_type_embeddings = nn.Embedding(2, d)
    emb.LayerNorm = nn.LayerNorm(d, eps=1e-12)
    enc.bert.encoder = nn.Module()
    enc.bert.encoder.layer = nn.ModuleList([TorchBertLayer(d, c["text_heads"], c["text_intermediate"])
                                            for _ in range(c["text_layers"])])
    enc.cls = nn.Module()
    pred = enc.cls.predictions = nn.Module()
    pred.transform = nn.Module()
    pred.transform.dense = nn.Linear(d, d)
    pred.transform.LayerNorm = nn.LayerNorm(d, eps=1e-12)
    pred.bias = nn.Parameter(torch.zeros(c["vocab_size"]))
    self.contra_head_v, self.contra_head_t = nn.Module(), nn.Module()
    self.contra_head_v.linear = nn.Linear(d, c["contrastive_dim"], bias=False)
    self.contra_head_t.linear = nn.Linear(d, c["contrastive_dim"], bias=False)
    self.itm_head = nn.Module()
    self.itm_head.linear1, self.itm_head.layernorm = nn.Linear(d, d), nn.LayerNorm(d, eps=1e-12)
    self.itm_head.linear2 = nn.Linear(d, 2)
    self.temperature, self.smoothing = c["temperature"], c["label_smoothing"]

  def load_original(self, state_dict):
    """The original's state_dict (`model.` prefixed): the tied decoder and the position_ids buffer are left out."""
    own = {k.removeprefix("model."): v for k, v in state_dict.items()}
    for k in ("multimodal_encoder.bert.embeddings.position_ids", "multimodal_encoder.cls.predictions.decoder.weight",
              "multimodal_encoder.cls.predictions.decoder.bias"):
      own.pop(k, None)
    self.load_state_dict(own, strict=True)

  def text(self, ids, mask, image_tokens=None, causal=False):
    emb = self.multimodal_encoder.bert.embeddings
    positions = torch.arange(ids.shape[1])
    x = emb.LayerNorm(emb.word_embeddings(ids) + emb.position_embeddings(positions)[None]
                      + emb.token_type_embeddings(torch.zeros_like(ids)))
    allowed = mask[:, None, None, :].bool()
    if causal:
      allowed = allowed & torch.tril(torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool))[None, None]
    bias = (~allowed).float() * -10000.0
    for layer in self.multimodal_encoder.bert.encoder.layer:
      x = layer(x, bias, image_tokens)
    return x

  def mlm_logits(self, hidden):
    pred = self.multimodal_encoder.cls.predictions
    h = pred.transform.LayerNorm(nn.functional.gelu(pred.transform.dense(hidden)))
    return h @ self.multimodal_encoder.bert.embeddings.word_embeddings.weight.T + pred.bias

  def losses(self, images_nchw, ids, mask, views, neg_image, neg_text):
    """The four objectives of the bundles' README for given masked views and negatives."""
    f = nn.functional
    tokens = self.vision_encoder(images_nchw)
    img = f.normalize(self.contra_head_v.linear(tokens[:, 0]), dim=-1)
    txt = f.normalize(self.contra_head_t.linear(self.text(ids, mask)[:, 0]), dim=-1)
    targets = torch.arange(len(ids))
    itc = (f.cross_entropy(img @ txt.T / self.temperature, targets, label_smoothing=self.smoothing)
           + f.cross_entropy(txt @ img.T / self.temperature, targets, label_smoothing=self.smoothing)) / 2
    out = {"itc": itc}
    for name, causal in (("mlm", False), ("gm", True)):
      hidden = self.text(views[f"{name}_input_ids"], mask, tokens, causal)
      out[name] = f.cross_entropy(self.mlm_logits(hidden).flatten(0, 1), views[f"{name}_labels"].flatten(),
                                  ignore_index=-100)
    cls = self.text(torch.cat([ids, ids, ids[neg_text]]), torch.cat([mask, mask, mask[neg_text]]),
                    torch.cat([tokens, tokens[neg_image], tokens]))[:, 0]
    h = self.itm_head
    logits = h.linear2(h.layernorm(f.gelu(h.linear1(cls))))
    labels = torch.cat([torch.ones(len(ids)), torch.zeros(2 * len(ids))]).long()
    out["itm"] = f.cross_entropy(logits, labels)
    return out
