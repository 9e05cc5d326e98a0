"""A training step computed the way the original PyTorch RetFiner computes it, for the speed comparison.

transformers' BertLMHeadModel (cross-attention in every layer) and a timm-style PyTorch ViT; per step:
the text-only pass for ITC, the text-only pass again for the ITM sampling weights, one `torch.multinomial`
call per row (a host sync each), a Python loop over rows for the MLM and GM masks, a separate BERT pass per
objective with the image keys/values recomputed in each, vocabulary logits at every position.
"""
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from torch_reference import TorchViT  # noqa: E402  (the small timm-style ViT the tests use)


def bidirectional_mask(mask):
  b, l = mask.shape
  return (1.0 - mask[:, None, None, :].float().expand(b, 1, l, l)) * torch.finfo(torch.float32).min


def mask_rows_python(ids, prob, vocab):
  """The original's masking: a Python loop over rows, redrawing a row until something is chosen."""
  ids, labels = ids.clone(), torch.full_like(ids, -100)
  for b in range(ids.shape[0]):
    eligible = (ids[b] != 0)
    eligible[0] = False
    if not bool(eligible.any()):
      continue
    while True:
      chosen = (torch.rand(ids.shape[1], device=ids.device) < prob) & eligible
      if bool(chosen.any()):  # Host sync.
        break
    labels[b][chosen] = ids[b][chosen]
    mode = torch.rand(ids.shape[1], device=ids.device)
    ids[b][chosen & (mode < 0.8)] = 103
    rand = chosen & (mode >= 0.8) & (mode < 0.9)
    ids[b][rand] = torch.randint(106, vocab, (int(rand.sum()),), device=ids.device)
  return ids, labels


class OriginalStyleRetFiner(nn.Module):
  def __init__(self, vit_kw, bert_config, contrastive_dim=512):
    super().__init__()
    from transformers import BertLMHeadModel
    self.vision = TorchViT(**vit_kw)
    self.bert = BertLMHeadModel(bert_config)
    d = bert_config.hidden_size
    self.contra_v = nn.Linear(d, contrastive_dim, bias=False)
    self.contra_t = nn.Linear(d, contrastive_dim, bias=False)
    self.itm_head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.LayerNorm(d, eps=1e-12), nn.Linear(d, 2))
    self.vocab = bert_config.vocab_size

  def text_only(self, ids, mask):
    return self.bert.bert(input_ids=ids, attention_mask=bidirectional_mask(mask)).last_hidden_state

  def forward(self, images, ids, mask):
    b = ids.shape[0]
    image = self.vision(images)
    img_f = F.normalize(self.contra_v(image[:, 0]), dim=-1)
    txt_f = F.normalize(self.contra_t(self.text_only(ids, mask)[:, 0]), dim=-1)
    sim_i2t = img_f @ txt_f.t() / 0.07
    sim_t2i = txt_f @ img_f.t() / 0.07
    targets = torch.arange(b, device=ids.device)
    itc = (F.cross_entropy(sim_i2t, targets, label_smoothing=0.1)
           + F.cross_entropy(sim_t2i, targets, label_smoothing=0.1)) / 2
    with torch.no_grad():  # The text-only pass again, for the sampling weights.
      txt_again = F.normalize(self.contra_t(self.text_only(ids, mask)[:, 0]), dim=-1)
      w_t2i = F.softmax(txt_again @ img_f.t() / 0.07, dim=1) + 1e-4
      w_i2t = F.softmax(img_f @ txt_again.t() / 0.07, dim=1) + 1e-4
      w_t2i.fill_diagonal_(0)
      w_i2t.fill_diagonal_(0)
    neg_image = [int(torch.multinomial(w_t2i[i], 1).item()) for i in range(b)]  # One host sync per row.
    neg_text = [int(torch.multinomial(w_i2t[i], 1).item()) for i in range(b)]
    ids3 = torch.cat([ids, ids, ids[neg_text]])
    mask3 = torch.cat([mask, mask, mask[neg_text]])
    image3 = torch.cat([image, image[neg_image], image])
    cls = self.bert.bert(input_ids=ids3, attention_mask=bidirectional_mask(mask3),
                         encoder_hidden_states=image3).last_hidden_state[:, 0]
    itm_labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long().to(ids.device)
    itm = F.cross_entropy(self.itm_head(cls), itm_labels)
    mlm_ids, mlm_labels = mask_rows_python(ids, 0.15, self.vocab)
    logits = self.bert(input_ids=mlm_ids, attention_mask=bidirectional_mask(mask), encoder_hidden_states=image).logits
    mlm = F.cross_entropy(logits.reshape(-1, self.vocab), mlm_labels.reshape(-1), ignore_index=-100)
    gm_ids, gm_labels = mask_rows_python(ids, 0.6, self.vocab)
    logits = self.bert(input_ids=gm_ids, attention_mask=mask, encoder_hidden_states=image).logits  # Causal.
    gm = F.cross_entropy(logits.reshape(-1, self.vocab), gm_labels.reshape(-1), ignore_index=-100)
    return itc + itm + mlm + gm
