"""A transcription of the BML release (Wei et al., TPAMI 2024, GeWu-Lab/BML_TPAMI2024 @ 4b3aa4f),
run beside the suite's `opm` (tests/test_opm.py) and `ogm_ge` with ratio_rule=tpami
(tests/test_ogm_ge.py) on identical tiny models, batches and RNG.

Transcribed lines, kept as the release writes them (names, in-place ReLU, Python `sum`, `.item()`):
- code/models/Classifier.py L9-72 (custom_autograd, Modality_drop, calcu_q) and L93-153
  (Classifier.forward). Changes: L53's stray `]` (a SyntaxError at HEAD) is removed; the ResNet18
  pooling lines L97-106 are left out, as the tiny encoders return pooled features; the 512 of the
  weight split (L139-140) is the feature size; `device` is the CPU.
- code/main.py L86-171 (one iteration of train()), with the OGM+ branch (L128-136, a hard-coded
  coefficient 4 behind `--use_OGM_plus`, which no script sets) left out.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
import torch.nn as nn


def bml_config(**overrides) -> SimpleNamespace:
    """Config() with the argparse defaults of main.py L34-50 laid over it, as cfg.parse does."""
    cfg = SimpleNamespace(use_modulation=False, use_adam_drop=False, modulation="OGM_GE", use_OGM_plus=False,
                          q_base=0.5, lam=0.5, p_exe=0.7, alpha=1.0, modulation_starts=0, modulation_ends=80,
                          d=[512, 512])
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


class custom_autograd(torch.autograd.Function):  # noqa: N801 -- the release's name
    @staticmethod
    def forward(ctx, input, theta):
        ctx.save_for_backward(input, theta)
        return input / (1 - theta.item())

    @staticmethod
    def backward(ctx, grad_output):
        input, theta = ctx.saved_tensors
        input_grad = 1 / (1 - theta.item()) * grad_output.clone()
        return input_grad, theta


class Modality_drop:  # noqa: N801 -- the release's name
    def __init__(self, dim_list, p_exe=0.7, device="cpu"):
        self.dim_list = dim_list
        self.p_exe = p_exe
        self.device = device

    def execute_drop(self, fead_list, q):
        B = fead_list[0].shape[0]
        D = fead_list[0].shape[1]
        exe_drop = torch.tensor(np.random.rand(1)).to(device=self.device) >= 1 - self.p_exe
        if not exe_drop:
            return fead_list, torch.ones([B], dtype=torch.int32, device=self.device)

        num_mod = len(fead_list)
        d_sum = sum(self.dim_list)
        q_sum = sum(self.dim_list * q)
        theta = q_sum / d_sum

        mask = torch.distributions.Bernoulli(1 - q).sample([B, 1]).permute(2, 1, 0).contiguous().reshape(
            num_mod, B, -1).to(device=self.device)  # [2,B,1]
        concat_list = torch.stack(fead_list, dim=0)  # [2,B,D]
        concat_list = torch.mul(concat_list, mask)
        concat_list = custom_autograd.apply(concat_list, theta)
        mask = torch.transpose(mask, 0, 1).squeeze(-1)  # [B,2]
        self.mask = mask  # instrumentation: not in the release
        update_flag = torch.sum(mask, dim=1) > 0
        cleaned_fea = torch.masked_select(concat_list, update_flag.unsqueeze(-1)).reshape(num_mod, -1, D)
        cleaned_fea = torch.chunk(cleaned_fea, num_mod, dim=0)  # L53, its stray `]` removed
        cleaned_fea = [_.squeeze(0) for _ in cleaned_fea]  # [B,D]
        return cleaned_fea, update_flag


def calcu_q(performance_1, performance_2, q_base, fix_lambda):
    q = torch.tensor([0.0, 0.0])
    relu = nn.ReLU(inplace=True)
    ratio_1 = torch.tanh(relu(performance_1 / performance_2 - 1))
    ratio_2 = torch.tanh(relu(performance_2 / performance_1 - 1))
    lamda = fix_lambda
    q[0] = q_base * (1 + lamda * ratio_1) if ratio_1 > 0 else 0
    q[1] = q_base * (1 + lamda * ratio_2) if ratio_2 > 0 else 0
    q = torch.clip(q, 0.0, 1.0)
    return q


class ConcatFusion(nn.Module):
    """fusion_model.py L16-25, holding a copy of the suite's head."""

    def __init__(self, fxy: nn.Linear) -> None:
        super().__init__()
        self.fxy = fxy

    def forward(self, x, y):
        out = torch.cat([x, y], dim=1)
        out = self.fxy(out)
        return x, y, out


class Classifier(nn.Module):
    """Classifier.py's model around copies of the suite method's encoders and concat head."""

    def __init__(self, cfg, encoder_1: nn.Module, encoder_2: nn.Module, fxy: nn.Linear) -> None:
        super().__init__()
        self.encoder_1 = encoder_1
        self.encoder_2 = encoder_2
        self.cfg = cfg
        self.device = "cpu"
        self.softmax = nn.Softmax(dim=1)
        self.fusion_model = ConcatFusion(fxy)
        self.split = encoder_1.out_dim  # the release's 512
        if self.cfg.use_adam_drop:
            self.modality_drop = Modality_drop(dim_list=torch.tensor(self.cfg.d), p_exe=self.cfg.p_exe,
                                               device=self.device)

    def forward(self, mod_1, mod_2, label, warm_up=1):
        out_1 = self.encoder_1(mod_1)
        out_2 = self.encoder_2(mod_2)
        B = out_1.shape[0]

        w = self.fusion_model.fxy.weight.clone().detach()
        b = self.fusion_model.fxy.bias.clone().detach()
        t1_bias = b / 2
        t2_bias = b / 2
        t1 = torch.mm(out_1, torch.transpose(w[:, :self.split], 0, 1)) + t1_bias
        t2 = torch.mm(out_2, torch.transpose(w[:, self.split:], 0, 1)) + t2_bias

        performance_1 = sum([self.softmax(t1)[i][int(label[i].item())] for i in range(t1.shape[0])])
        performance_2 = sum([self.softmax(t2)[i][int(label[i].item())] for i in range(t2.shape[0])])

        if warm_up == 0 and self.cfg.use_adam_drop:
            self.q = calcu_q(performance_1, performance_2, self.cfg.q_base, fix_lambda=self.cfg.lam)
            cleaned_fea, update_flag = self.modality_drop.execute_drop([out_1, out_2], self.q)
            cleaned_fae_1, cleaned_fea_2, out = self.fusion_model(cleaned_fea[0], cleaned_fea[1])
            return t1, t2, out, update_flag, performance_1, performance_2
        else:
            x, y, out = self.fusion_model(out_1, out_2)
            return t1, t2, out, torch.ones([B], dtype=torch.int32, device=self.device), performance_1, performance_2


def train_iteration(cfg, epoch, model, optimizer, spec, image, label) -> dict:
    """main.py L86-171 for one batch; returns what the iteration computed (None if it skipped)."""
    loss_fn = nn.CrossEntropyLoss()
    relu = nn.ReLU(inplace=True)
    tanh = nn.Tanh()
    optimizer.zero_grad()
    warm_up = 1 if epoch <= 5 else 0
    out_1, out_2, out, update_flag, performance_1, performance_2 = model(spec, image, label, warm_up)

    if warm_up == 0 and cfg.use_adam_drop:
        if torch.sum(update_flag, dim=0) == 0:
            return None
        select_mask = update_flag != 0
        label = label[select_mask]
        out_1 = out_1[select_mask]
        out_2 = out_2[select_mask]

    loss = loss_fn(out, label)
    loss.backward()

    coeff_1 = coeff_2 = radio_1 = radio_2 = None
    if warm_up == 0 and cfg.use_modulation:
        radio_1 = performance_1 / performance_2
        radio_2 = performance_2 / performance_1
        if radio_1 > 1:
            coeff_1 = 1 - tanh(cfg.alpha * relu(radio_1))
            coeff_2 = 1
        else:
            coeff_1 = 1
            coeff_2 = 1 - tanh(cfg.alpha * relu(radio_2))

        if cfg.modulation_starts <= epoch <= cfg.modulation_ends:
            for name, parms in model.named_parameters():
                layer_name = str(name).split(".")[0]
                if "encoder_1" in layer_name and parms.grad is not None and len(parms.grad.size()) == 4:
                    if cfg.modulation == "OGM_GE":
                        parms.grad = parms.grad * coeff_1 + \
                            torch.zeros_like(parms.grad).normal_(0, parms.grad.std().item() + 1e-8)
                    elif cfg.modulation == "OGM":
                        parms.grad *= coeff_1

                if "encoder_2" in layer_name and parms.grad is not None and len(parms.grad.size()) == 4:
                    if cfg.modulation == "OGM_GE":
                        parms.grad = parms.grad * coeff_2 + \
                            torch.zeros_like(parms.grad).normal_(0, parms.grad.std().item() + 1e-8)
                    elif cfg.modulation == "OGM":
                        parms.grad *= coeff_2

    optimizer.step()
    return {"loss": loss.detach(), "update_flag": update_flag, "performance": (performance_1, performance_2),
            "q": getattr(model, "q", None) if warm_up == 0 and cfg.use_adam_drop else None,
            "radio": (radio_1, radio_2), "coeff": (coeff_1, coeff_2)}
