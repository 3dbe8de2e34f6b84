"""An ensemble of fine-tuned classifiers that decides by the median of their class probabilities.

`finetune.ensemble: N` (stages/soup.py) fine-tunes a classifier N times, the runs alike but for the
seed, and keeps all N models in one checkpoint: model.safetensors holds member i's tensors under
`members.<i>.`, model.json is the members' shared config, meta.json says `"ensemble": N`.

Why the median: for an odd N, "the median of the members' p(class) >= t" holds exactly when a majority
of the members has p(class) >= t, so with two classes (spam / ham) a threshold on the ensemble's
probability is the members' majority vote at that threshold, and one stray member cannot move it (a
mean can be dragged by one confident member). With more classes the medians are renormalised to sum
to 1, so the vote is only approximate there. On the spam CV folds (README, "ninth round") three members voting made 32 and 31 errors on
fresh seeds, where one member alone made 34 to 42 and the character SVM 44.

Only classification uses an ensemble (classify, evaluate, the test split): load_checkpoint refuses it
elsewhere (generation, export, fine-tuning from it), where one model is needed.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from llmstages.model import GPT, GPTConfig

PREFIX = "members."


def median_probabilities(probs: torch.Tensor) -> torch.Tensor:
    """(M, B, K) class probabilities of M members -> (B, K): each class's median over the members
    (the mean of the two middle values for an even M), renormalised to sum to 1 per row (with two
    classes the medians already do)."""
    med = probs.float().quantile(0.5, dim=0)  # (B, K); quantile interpolates the two middle values
    return med / med.sum(dim=-1, keepdim=True).clamp_min(1e-12)


class Ensemble(nn.Module):
    """N classifiers of one config; called like a GPT classifier (`last_index`), it returns log-probabilities
    (B, K) whose softmax is `median_probabilities` of the members' softmaxes."""

    def __init__(self, members: list[GPT]):
        super().__init__()
        if len(members) < 2:
            raise ValueError(f"an ensemble needs at least 2 members, not {len(members)}")
        if not members[0].config.num_classes:
            raise ValueError("an ensemble is made of classifiers: the config has no class head")
        self.members = nn.ModuleList(members)

    @classmethod
    def build(cls, config: GPTConfig, size: int) -> Ensemble:
        """`size` new members of `config`, to load saved weights into."""
        return cls([GPT(config) for _ in range(size)])

    @property
    def config(self) -> GPTConfig:
        return self.members[0].config

    @property
    def is_classifier(self) -> bool:
        return True

    def forward(self, idx: torch.Tensor, *, last_index: torch.Tensor) -> torch.Tensor:
        probs = torch.stack([m(idx, last_index=last_index).float().softmax(dim=-1) for m in self.members])  # (M, B, K)
        return median_probabilities(probs).clamp_min(1e-30).log()  # (B, K)

    def state_for_saving(self) -> dict[str, torch.Tensor]:
        return {f"{PREFIX}{i}.{k}": v for i, m in enumerate(self.members) for k, v in m.state_for_saving().items()}

    def load_saved_state(self, state: dict[str, torch.Tensor], *, strict: bool = True) -> None:
        for i, member in enumerate(self.members):
            head = f"{PREFIX}{i}."
            member.load_saved_state({k[len(head):]: v for k, v in state.items() if k.startswith(head)}, strict=strict)
