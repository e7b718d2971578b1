"""The LightningModule: BCE on labels, AdamW with warm-up + linear decay, AUROC on validation."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torchmetrics.classification import BinaryAUROC

from models import _quiet  # noqa: F401  (before lightning is imported)
from models.network import TextSource, TwoTowerWide


def batch_logits(net: TwoTowerWide, texts: TextSource, item_vocab_of_index: torch.Tensor,
                 user, item, hist, query) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Deduplicate the batch's items (targets + histories) and queries, encode each once.

    Returns (unique item text vectors, their vocab ids, target positions, history positions)
    plus nothing else; queries are handled by :func:`batch_queries`.
    """
    hist_mask = hist >= 0
    all_items = torch.cat([item, hist[hist_mask]])
    uniq, inv = torch.unique(all_items, return_inverse=True)
    target_pos = inv[: item.shape[0]]
    hist_pos = torch.full_like(hist, -1)
    hist_pos[hist_mask] = inv[item.shape[0]:]
    return texts("item", uniq), item_vocab_of_index[uniq], target_pos, hist_pos


def batch_queries(texts: TextSource, query: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    has = query >= 0
    if not bool(has.any()):
        return None, None
    uniq, inv = torch.unique(query.clamp(min=0)[has], return_inverse=True)
    vecs_u = texts("query", uniq)
    vecs = torch.zeros((query.shape[0], vecs_u.shape[1]), dtype=vecs_u.dtype, device=vecs_u.device)
    vecs[has] = vecs_u[inv]
    return vecs, has


class RecommenderModule(pl.LightningModule):
    def __init__(self, net: TwoTowerWide, texts: TextSource, item_vocab_of_index: torch.Tensor,
                 lr_heads: float = 3e-3, lr_encoder: float = 2e-5, weight_decay: float = 0.01,
                 warmup_steps: int = 50):
        super().__init__()
        self.net = net
        self.texts = texts
        self.register_buffer("item_vocab_of_index", item_vocab_of_index.clone(), persistent=False)
        self.lr_heads, self.lr_encoder = float(lr_heads), float(lr_encoder)
        self.weight_decay, self.warmup_steps = float(weight_decay), int(warmup_steps)
        self.val_auc = BinaryAUROC()

    def forward(self, user, item, hist, query, wide):
        item_vecs, item_ids, target_pos, hist_pos = batch_logits(self.net, self.texts, self.item_vocab_of_index,
                                                                 user, item, hist, query)
        qv, has_q = batch_queries(self.texts, query)
        return self.net(item_vecs.float(), item_ids, target_pos, hist_pos, user, qv if qv is None else qv.float(),
                        has_q, wide)

    def on_train_epoch_start(self) -> None:
        # transformers loads models in eval mode and Lightning keeps submodule modes:
        # switch the encoder to train mode ourselves so its dropout is active when we fine-tune it.
        if self.texts.trains_encoder:
            self.texts.encoder.train()

    def training_step(self, batch, batch_idx):
        user, item, hist, query, wide, label = batch
        logits = self(user, item, hist, query, wide)
        loss = F.binary_cross_entropy_with_logits(logits.float(), label)
        self.log("train_loss", loss, prog_bar=False, on_step=False, on_epoch=True, batch_size=label.shape[0])
        return loss

    def validation_step(self, batch, batch_idx):
        user, item, hist, query, wide, label = batch
        logits = self(user, item, hist, query, wide).float()
        loss = F.binary_cross_entropy_with_logits(logits, label)
        self.val_auc.update(torch.sigmoid(logits), label.long())
        self.log("val_loss", loss, on_step=False, on_epoch=True, batch_size=label.shape[0], sync_dist=True)
        self.log("val_auc", self.val_auc, on_step=False, on_epoch=True)

    def configure_optimizers(self):
        enc_ids = set()
        enc_params = []
        if self.texts.trains_encoder:
            enc_params = [p for p in self.texts.encoder.parameters() if p.requires_grad]
            enc_ids = {id(p) for p in enc_params}
        head_params = [p for p in self.parameters() if p.requires_grad and id(p) not in enc_ids]
        no_decay = lambda p: p.ndim < 2
        groups = [
            {"params": [p for p in head_params if not no_decay(p)], "lr": self.lr_heads,
             "weight_decay": self.weight_decay},
            {"params": [p for p in head_params if no_decay(p)], "lr": self.lr_heads, "weight_decay": 0.0},
        ]
        if enc_params:
            groups.append({"params": enc_params, "lr": self.lr_encoder, "weight_decay": self.weight_decay})
        groups = [g for g in groups if g["params"]]
        opt = torch.optim.AdamW(groups)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warm = min(self.warmup_steps, max(total // 10, 1))

        def schedule(step: int) -> float:
            if step < warm:
                return (step + 1) / warm
            return max(0.05, 1.0 - (step - warm) / max(total - warm, 1))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
