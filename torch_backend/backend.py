"""The PyTorch implementation of mlxpost's Backend protocol (mlxpost/backend.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from mlxpost import adapters
from mlxpost.backend import LoraConfig, OptimConfig, Samples, SamplingConfig
from mlxpost.backend_shared.forward import SharedForward
from mlxpost.backend_shared.heads import logits_chunk_rows
from mlxpost.backend_shared.training import process_peak_memory_gb
from mlxpost.backend_shared.unpad import unpad_plan
from mlxpost.functional import head_terms
from torch_backend import allocator, checkpoint_io, fsdp, lora, modeling, sampling, training
from torch_backend.modeling import TorchModel
from torch_backend.ops import TorchOps


class TorchForward(SharedForward):
    """The differentiable view a loss function receives (mlxpost.backend.Forward)."""

    def __init__(self, model):
        super().__init__(model)
        self.plans: dict[int, tuple] = {}  # id(mask) -> (mask, its unpadding plan or None)

    def plan(self, mask):
        """The mask's unpadding plan (backend_shared/unpad.py), read on the host once."""
        entry = self.plans.get(id(mask))
        if entry is None or entry[0] is not mask:
            entry = self.plans[id(mask)] = (mask, unpad_plan(mask.cpu().numpy()))
        return entry[1]

    def head_rows(self, attention_mask):
        plan = self.plan(attention_mask)
        if plan is None:
            return None
        device = attention_mask.device
        return (
            torch.as_tensor(plan.head_keep, device=device),
            torch.as_tensor(plan.head_restore, device=device),
        )

    def hidden(self, input_ids, attention_mask):
        plan = self.plan(attention_mask)
        return modeling.hidden_states(self.model, input_ids, attention_mask, plan)

    def hidden_and_scores(self, input_ids, attention_mask):
        hidden = self.hidden(input_ids, attention_mask)
        return hidden, self.model.score(hidden.float())[..., 0]

    def scores(self, input_ids, attention_mask):
        return modeling.scores(self.model, input_ids, attention_mask)

    def frozen_hidden(self, role, input_ids, attention_mask):
        """Final hidden states of the frozen model for `role` (frozen_model); no gradient."""
        plan = self.plan(attention_mask)
        with torch.no_grad(), self.frozen_model(role) as other:
            return modeling.hidden_states(other, input_ids, attention_mask, plan)

    def head(self, hidden, role=None):
        """float32 logits of hidden states (..., H): this model's head, or (role) the frozen
        one's, carrying no gradient."""
        if role is None:
            return modeling.lm_logits(self.model, hidden).float()
        with torch.no_grad(), self.frozen_model(role) as other:
            return modeling.lm_logits(other, hidden).float()

    def recomputes(self, rows) -> bool:
        return torch.is_grad_enabled() and rows.requires_grad

    def checkpointed(self, fn, rows, chain):
        """Non-reentrant torch.utils.checkpoint: closures' parameters get their gradients.
        torch runs the chunks in order by itself (eagerly forward, one backward node at a
        time), so the chain is not needed."""
        return checkpoint(fn, rows, use_reentrant=False)

    @staticmethod
    def concatenate(tensors):
        return torch.cat(tensors)


class TorchBackend:
    name = "torch"

    def __init__(self, device: str | None = None):
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # Parity needs true float32 matmuls: TF32 rounds inputs to 10 mantissa bits.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        self.ops = TorchOps(self.device)
        if self.device.type == "cpu":
            allocator.keep_freed_memory()

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return f"torch {torch.__version__} on {name}"

    def peak_memory_gb(self) -> float | None:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**30
        return process_peak_memory_gb()

    # ---- conversion ----
    def tensor(self, array: np.ndarray) -> torch.Tensor:
        array = np.asarray(array)
        if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
            return torch.as_tensor(array, dtype=torch.long, device=self.device)
        return torch.as_tensor(array, dtype=torch.float32, device=self.device)

    def batch_to_tensors(self, batch: dict) -> dict:
        return {
            k: self.tensor(v) if isinstance(v, (np.ndarray, np.generic)) else v
            for k, v in batch.items()
        }

    # ---- models ----
    def load_model(
        self, path: str, dtype: str = "float32", quantize: int | None = None
    ) -> TorchModel:
        if quantize is not None:
            import importlib.util

            from mlxpost.errors import UserError

            if self.device.type != "cuda" or importlib.util.find_spec("bitsandbytes") is None:
                raise UserError(
                    "--quantize needs bitsandbytes on a CUDA GPU with the torch backend; "
                    "use --backend mlx"
                )
            raise UserError(
                "--quantize is not implemented for the torch backend yet; use --backend mlx"
            )
        return modeling.load(path, dtype, self.device)

    def attach_scalar_head(self, model: TorchModel, seed: int = 0) -> None:
        modeling.attach_scalar_head(model, seed)

    def attach_lora(self, model: TorchModel, cfg: LoraConfig, seed: int = 0) -> None:
        if model.lora:
            raise ValueError("a LoRA adapter is already attached")
        targets = adapters.resolve_targets(model.arch, cfg)
        for param in model.module.parameters():
            param.requires_grad_(False)
        model.lora = lora.attach(model.module, targets, cfg.rank, cfg.scale, cfg.dropout, seed)
        model.lora_cfg, model.lora_targets = cfg, targets

    def attach_frozen(self, model: TorchModel, role: str, other: TorchModel) -> None:
        """A frozen model (reference, teacher) whose logits losses can ask for."""
        for param in other.module.parameters():
            param.requires_grad_(False)
        model.frozen[role] = other

    def set_grad_checkpoint(self, model: TorchModel, enabled: bool) -> None:
        modeling.set_grad_checkpoint(model, enabled)

    def shard_weights(self, model: TorchModel) -> None:
        """FSDP (torch_backend/fsdp.py): each rank of a data-parallel run keeps its share of
        every weight, gradient and optimizer moment; the model's other calls are unchanged
        but are collective (every rank makes them)."""
        if model.lora:
            raise ValueError("sharding is for full fine-tuning; this model has a LoRA adapter")
        model.shell = fsdp.shard(model.module, modeling.decoder_layers(model.module))

    def set_logits_chunk(self, model: TorchModel, rows: int | None) -> None:
        """Rows of logits the loss head computes at once (None: the default; 0: all)."""
        logits_chunk_rows(rows, 1)  # refuses a negative count
        model.logits_chunk = rows

    def set_adapter_enabled(self, model: TorchModel, enabled: bool) -> None:
        for layer in model.lora.values():
            layer.enabled = enabled

    @contextlib.contextmanager
    def dropout_on(self, model):
        """LoRA dropout is active only inside training steps; model dropouts stay off."""
        for layer in model.lora.values():
            layer.lora_dropout.train(True)
        try:
            yield
        finally:
            for layer in model.lora.values():
                layer.lora_dropout.train(False)

    def save_adapter(self, model: TorchModel, directory: str) -> None:
        if not model.lora:
            raise ValueError("no LoRA adapter attached")
        adapters.save_adapter(
            directory,
            lora.lora_state(model.lora),
            model.lora_cfg,
            model.lora_targets,
            model.arch,
            model.path,
        )

    def load_adapter(self, model: TorchModel, directory: str) -> None:
        cfg, weights = adapters.load_adapter(directory)
        if not model.lora:
            self.attach_lora(model, cfg)
        adapters.check_adapter_fits(directory, lora.lora_state(model.lora), weights)
        params = dict(model.module.named_parameters())
        with torch.no_grad():
            for name, value in weights.items():
                params[name].copy_(torch.from_numpy(value))

    def parameters(self, model: TorchModel, trainable_only: bool = False) -> dict[str, np.ndarray]:
        if trainable_only:
            return modeling.to_numpy_params(model.named_trainable())
        params = dict(model.module.named_parameters())
        if model.score is not None:
            params.update({f"score.{n}": p for n, p in model.score.named_parameters()})
        return modeling.to_numpy_params(params)

    def set_parameters(self, model: TorchModel, params: dict[str, np.ndarray]) -> None:
        named = dict(model.module.named_parameters())
        if model.score is not None:
            named.update({f"score.{n}": p for n, p in model.score.named_parameters()})
        with torch.no_grad():
            for name, value in params.items():
                if name not in named:
                    raise KeyError(f"unknown parameter {name!r}")
                value = torch.as_tensor(value).to(named[name].dtype)
                named[name].copy_(fsdp.like(value, named[name]))  # a shard: its own part

    def parameter_count(self, model: TorchModel) -> tuple[int, int]:
        trainable = sum(p.numel() for p in model.named_trainable().values())
        total = sum(p.numel() for p in model.module.parameters())
        if model.score is not None:
            total += sum(p.numel() for p in model.score.parameters())
        return trainable, total

    # ---- compute ----
    @torch.no_grad()
    def logprobs(self, model, input_ids, attention_mask, temperature: float = 1.0) -> np.ndarray:
        ids, mask = self.tensor(input_ids), self.tensor(attention_mask)
        with fsdp.gathered(model.shell):
            terms = head_terms(self.ops, TorchForward(model), ids, mask, temperature=temperature)
        return terms["logprobs"].cpu().numpy()

    @torch.no_grad()
    def token_logits(self, model, input_ids, attention_mask) -> np.ndarray:
        ids, mask = self.tensor(input_ids), self.tensor(attention_mask)
        with fsdp.gathered(model.shell):
            return modeling.logits(model, ids, mask).float().cpu().numpy()

    @torch.no_grad()
    def hidden_states(self, model, input_ids, attention_mask) -> np.ndarray:
        ids, mask = self.tensor(input_ids), self.tensor(attention_mask)
        with fsdp.gathered(model.shell):
            return modeling.hidden_states(model, ids, mask).float().cpu().numpy()

    @torch.no_grad()
    def scores(self, model, input_ids, attention_mask) -> np.ndarray:
        ids, mask = self.tensor(input_ids), self.tensor(attention_mask)
        with fsdp.gathered(model.shell):
            return modeling.scores(model, ids, mask).cpu().numpy()

    def sample(
        self,
        model: TorchModel,
        prompts: Sequence[Sequence[int]],
        cfg: SamplingConfig,
        eos_ids: Sequence[int],
        pad_id: int,
        seed: int,
    ) -> Samples:
        with fsdp.gathered(model.shell):
            return sampling.sample(model, prompts, cfg, eos_ids, pad_id, seed, self.device)

    # ---- training ----
    def make_optimizer(self, model: TorchModel, cfg: OptimConfig) -> training.TorchOptimizer:
        return training.TorchOptimizer(model.named_trainable(), cfg)

    def loss_and_grads(self, model: TorchModel, loss_fn, batch: dict):
        params = model.named_trainable()
        loss_fn = in_shell(model, loss_fn)
        with self.dropout_on(model):
            loss, metrics = loss_fn(self.ops, TorchForward(model), self.batch_to_tensors(batch))
            loss.backward()
        grads = {
            n: fsdp.full(p.grad.detach()).float().cpu().numpy()
            for n, p in params.items()
            if p.grad is not None
        }
        for p in params.values():
            p.grad = None
        return float(loss.detach()), {k: float(v.detach()) for k, v in metrics.items()}, grads

    @torch.no_grad()
    def compute_loss(self, model: TorchModel, loss_fn, batch: dict) -> tuple[float, dict]:
        """The loss and metrics of loss_fn without gradients or dropout."""
        with fsdp.gathered(model.shell):
            loss, metrics = loss_fn(self.ops, TorchForward(model), self.batch_to_tensors(batch))
        return float(loss), {k: float(v) for k, v in metrics.items()}

    def train_step(self, model, optimizer, loss_fn, microbatches, weights=None) -> dict[str, float]:
        with self.dropout_on(model):
            return training.train_step(
                optimizer,
                TorchForward(model),
                self.ops,
                in_shell(model, loss_fn),
                microbatches,
                weights,
                self.batch_to_tensors,
            )

    def optimizer_state(self, optimizer: training.TorchOptimizer) -> dict:
        return optimizer.state()

    def load_optimizer_state(self, optimizer: training.TorchOptimizer, state: dict) -> None:
        optimizer.load_state(state)

    def seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    # ---- checkpoint tensors (merge, soup) ----
    def open_safetensors(self, path: str) -> Callable[[str], torch.Tensor]:
        return checkpoint_io.open_safetensors(path)

    def tensor_to_numpy(self, tensor: torch.Tensor) -> np.ndarray:
        return checkpoint_io.to_numpy(tensor)

    def tensor_from_numpy(self, array: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        return checkpoint_io.from_numpy(array, like)

    def is_float_tensor(self, tensor: torch.Tensor) -> bool:
        return checkpoint_io.is_float(tensor)

    def save_safetensors(self, tensors: dict[str, torch.Tensor], path: str) -> None:
        checkpoint_io.save_safetensors(tensors, path)


def in_shell(model: TorchModel, loss_fn):
    """loss_fn run inside the root FSDP unit's forward when the model is sharded (fsdp.py)."""
    if model.shell is None:
        return loss_fn
    return lambda ops, forward, batch: model.shell(loss_fn, ops, forward, batch)
