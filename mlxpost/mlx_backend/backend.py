"""The MLX implementation of mlxpost's Backend protocol (mlxpost/backend.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlxpost import adapters
from mlxpost.backend import LoraConfig, OptimConfig, Samples, SamplingConfig
from mlxpost.backend_shared.forward import SharedForward
from mlxpost.backend_shared.heads import logits_chunk_rows, model_chunk_rows
from mlxpost.backend_shared.unpad import PLAN_KEYS, plan_arrays
from mlxpost.errors import UserError
from mlxpost.functional import head_terms
from mlxpost.mlx_backend import checkpoint_io, lora, modeling, sampling, training
from mlxpost.mlx_backend.modeling import MLXModel
from mlxpost.mlx_backend.models.gpt2 import chained_chunk, checkpointed
from mlxpost.mlx_backend.ops import MLXOps


class MLXForward(SharedForward):
    """The differentiable view a loss function receives (mlxpost.backend.Forward).

    A training step is traced (mx.compile), so the trunk cannot read a mask on the host to
    drop its padding (backend_shared/unpad.py): the plan comes in the batch (batch_to_arrays)
    and `bind` files it under the batch's attention-mask array, which the loss passes on."""

    def __init__(self, model):
        super().__init__(model)
        self.plans: dict[int, tuple] = {}  # id(mask) -> (mask, plan arrays)

    def bind(self, batch: dict) -> dict:
        """The batch without its plan arrays, the plan filed for its attention mask."""
        plan = tuple(batch[k] for k in PLAN_KEYS if k in batch)
        batch = {k: v for k, v in batch.items() if k not in PLAN_KEYS}
        if len(plan) == len(PLAN_KEYS):
            self.register(batch["attention_mask"], plan)
        return batch

    def register(self, mask, plan) -> None:
        self.plans[id(mask)] = (mask, plan)

    def plan(self, mask):
        entry = self.plans.get(id(mask))
        return entry[1] if entry is not None and entry[0] is mask else None

    def head_rows(self, attention_mask):
        plan = self.plan(attention_mask)
        return None if plan is None else plan[3:5]

    def hidden(self, input_ids, attention_mask):
        plan = self.plan(attention_mask)
        return modeling.hidden_states(self.model, input_ids, attention_mask, plan)

    def hidden_and_scores(self, input_ids, attention_mask):
        hidden = self.hidden(input_ids, attention_mask)
        return hidden, self.model.module.score(hidden.astype(mx.float32))[..., 0]

    def scores(self, input_ids, attention_mask):
        plan = self.plan(attention_mask)
        return modeling.scores(self.model, input_ids, attention_mask, plan)

    def frozen_hidden(self, role, input_ids, attention_mask):
        """Final hidden states of the frozen model for `role` (frozen_model); no gradient."""
        plan = self.plan(attention_mask)
        with self.frozen_model(role) as other:
            hidden = modeling.hidden_states(other, input_ids, attention_mask, plan)
            return mx.stop_gradient(hidden)

    def head(self, hidden, role=None):
        """float32 logits of hidden states (..., H): this model's head, or (role) the frozen
        one's, carrying no gradient."""
        if role is None:
            return self.model.module.lm_logits(hidden).astype(mx.float32)
        with self.frozen_model(role) as other:
            return mx.stop_gradient(other.module.lm_logits(hidden).astype(mx.float32))

    def checkpointed(self, fn, rows, chain):
        """The chunk through a custom function whose backward recomputes it (the head's
        parameters are its inputs, so their gradients flow), chained to the chunk before it
        with mx.depends in both passes: MLX evaluates a graph in any order its inputs allow,
        and unchained it would hold most chunks' logits at once. A head with an active
        dropout (a LoRA on lm_head) goes through mx.checkpoint with its masks keyed instead."""
        module = self.model.module.head_module()
        if any(isinstance(m, nn.Dropout) and m.training for _, m in module.named_modules()):
            return checkpointed(module, fn, rows)
        return chained_chunk(module, fn, rows, chain)

    concatenate = staticmethod(mx.concatenate)


class MLXBackend:
    name = "mlx"

    def __init__(self, compile: bool = True):
        self.ops = MLXOps()
        self.compile = compile  # mx.compile the forward+backward of training steps

    def describe(self) -> str:
        return f"mlx {mx.__version__} on {mx.default_device()}"

    def peak_memory_gb(self) -> float:
        """The allocator's peak, which holds on the CPU build the arrays Metal would."""
        return mx.get_peak_memory() / 2**30

    # ---- conversion ----
    @staticmethod
    def array(value: np.ndarray) -> mx.array:
        value = np.asarray(value)
        if np.issubdtype(value.dtype, np.integer) or value.dtype == np.bool_:
            return mx.array(value.astype(np.int32))
        return mx.array(value.astype(np.float32))

    def batch_to_arrays(self, batch: dict) -> dict:
        """mx arrays of a batch's numpy ones, with the plan that runs its trunk without
        padding when there is one (MLXForward.bind takes it)."""
        batch = {**batch, **plan_arrays(batch)}
        return {
            k: self.array(v) if isinstance(v, (np.ndarray, np.generic)) else v
            for k, v in batch.items()
        }

    # ---- models ----
    def load_model(
        self, path: str, dtype: str = "float32", quantize: int | None = None
    ) -> MLXModel:
        return modeling.load(path, dtype, quantize)

    def attach_scalar_head(self, model: MLXModel, seed: int = 0) -> None:
        modeling.attach_scalar_head(model, seed)
        model.grad_functions.clear()

    def attach_lora(self, model: MLXModel, cfg: LoraConfig, seed: int = 0) -> None:
        if model.lora:
            raise ValueError("a LoRA adapter is already attached")
        targets = adapters.resolve_targets(model.arch, cfg)
        model.module.freeze()
        model.lora = lora.attach(model.module, targets, cfg.rank, cfg.scale, cfg.dropout, seed)
        for layer in model.lora.values():
            layer.unfreeze(keys=["lora_A", "lora_B"], recurse=True)
        if model.has_score:
            model.module.score.unfreeze()
        model.lora_cfg, model.lora_targets = cfg, targets
        model.grad_functions.clear()

    def attach_frozen(self, model: MLXModel, role: str, other: MLXModel) -> None:
        """A frozen model (reference, teacher) whose logits losses can ask for."""
        other.module.freeze()
        model.frozen[role] = other
        model.grad_functions.clear()

    def shard_weights(self, model: MLXModel) -> None:
        """Not on MLX: its data-parallel ranks each hold the whole model (mlxpost.distributed)."""
        raise UserError("--fsdp is torch's FSDP: use --backend torch")

    def set_grad_checkpoint(self, model: MLXModel, enabled: bool) -> None:
        """Each transformer block runs through mx.checkpoint in training passes (models/)."""
        model.module.grad_checkpoint = bool(enabled)
        model.grad_functions.clear()  # compiled steps bake the setting in

    def set_logits_chunk(self, model: MLXModel, rows: int | None) -> None:
        """Rows of logits the loss head computes at once (None: the default; 0: all)."""
        logits_chunk_rows(rows, 1)  # refuses a negative count
        model.logits_chunk = rows
        model.grad_functions.clear()  # compiled steps bake the setting in

    def set_adapter_enabled(self, model: MLXModel, enabled: bool) -> None:
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

    def save_adapter(self, model: MLXModel, directory: str) -> None:
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

    def load_adapter(self, model: MLXModel, directory: str) -> None:
        cfg, weights = adapters.load_adapter(directory)
        if not model.lora:
            self.attach_lora(model, cfg)
        expected = lora.lora_state(model.lora)
        adapters.check_adapter_fits(directory, expected, weights)
        model.module.load_weights([(n, mx.array(w)) for n, w in weights.items()], strict=False)
        mx.eval(model.module.parameters())

    def parameters(self, model: MLXModel, trainable_only: bool = False) -> dict[str, np.ndarray]:
        return modeling.to_numpy_params(lora.named_parameters(model.module, trainable_only))

    def set_parameters(self, model: MLXModel, params: dict[str, np.ndarray]) -> None:
        named = lora.named_parameters(model.module)
        unknown = sorted(set(params) - set(named))
        if unknown:
            raise KeyError(f"unknown parameters {unknown[:3]}")
        model.module.load_weights(
            [(n, mx.array(v).astype(named[n].dtype)) for n, v in params.items()], strict=False
        )
        mx.eval(model.module.parameters())

    def parameter_count(self, model: MLXModel) -> tuple[int, int]:
        trainable = sum(p.size for p in model.named_trainable().values())
        total = sum(p.size for p in lora.named_parameters(model.module).values())
        return trainable, total

    # ---- compute ----
    def logprobs(self, model, input_ids, attention_mask, temperature: float = 1.0) -> np.ndarray:
        arrays = {"input_ids": np.asarray(input_ids), "attention_mask": np.asarray(attention_mask)}
        batch = self.batch_to_arrays(arrays)
        forward = MLXForward(model)
        batch = forward.bind(batch)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        terms = head_terms(self.ops, forward, ids, mask, temperature=temperature)
        return np.array(terms["logprobs"])

    def token_logits(self, model, input_ids, attention_mask) -> np.ndarray:
        ids, mask = self.array(input_ids), self.array(attention_mask)
        return np.array(modeling.logits(model, ids, mask).astype(mx.float32))

    def hidden_states(self, model, input_ids, attention_mask) -> np.ndarray:
        ids, mask = self.array(input_ids), self.array(attention_mask)
        return np.array(modeling.hidden_states(model, ids, mask).astype(mx.float32))

    def scores(self, model, input_ids, attention_mask) -> np.ndarray:
        ids, mask = self.array(input_ids), self.array(attention_mask)
        return np.array(modeling.scores(model, ids, mask))

    def sample(
        self,
        model: MLXModel,
        prompts: Sequence[Sequence[int]],
        cfg: SamplingConfig,
        eos_ids: Sequence[int],
        pad_id: int,
        seed: int,
    ) -> Samples:
        return sampling.sample(model, prompts, cfg, eos_ids, pad_id, seed)

    # ---- training ----
    def make_optimizer(self, model: MLXModel, cfg: OptimConfig) -> training.MLXOptimizer:
        return training.MLXOptimizer(model.module, cfg)

    def loss_and_grads(self, model: MLXModel, loss_fn, batch: dict):
        with self.dropout_on(model):
            grads, loss, metrics = training.accumulate_grads(
                model,
                MLXForward(model),
                self.ops,
                loss_fn,
                [batch],
                [1.0],
                self.batch_to_arrays,
                self.compiles(model, [batch]),
            )
        return loss, metrics, modeling.to_numpy_params(dict(training.tree_flatten(grads)))

    def compiles(self, model: MLXModel, microbatches) -> bool:
        """Whether a training step is compiled: unless its loss head runs in several chunks.
        Compiled, the chunks lose their order and most of their logits live at once
        (measured: about twice the uncompiled peak); the head's matmuls dominate such steps."""
        size = model_chunk_rows(model)
        rows = max(b["input_ids"].shape[0] * (b["input_ids"].shape[1] - 1) for b in microbatches)
        return self.compile and (size is None or rows <= size)

    def compute_loss(self, model: MLXModel, loss_fn, batch: dict) -> tuple[float, dict]:
        """The loss and metrics of loss_fn without gradients or dropout."""
        forward = MLXForward(model)
        loss, metrics = loss_fn(self.ops, forward, forward.bind(self.batch_to_arrays(batch)))
        mx.eval(loss, metrics)
        return loss.item(), {k: float(v) for k, v in metrics.items()}

    def train_step(self, model, optimizer, loss_fn, microbatches, weights=None) -> dict[str, float]:
        with self.dropout_on(model):
            return training.train_step(
                model,
                optimizer,
                MLXForward(model),
                self.ops,
                loss_fn,
                microbatches,
                weights,
                self.batch_to_arrays,
                self.compiles(model, microbatches),
            )

    def optimizer_state(self, optimizer: training.MLXOptimizer) -> dict:
        return optimizer.state()

    def load_optimizer_state(self, optimizer: training.MLXOptimizer, state: dict) -> None:
        optimizer.load_state(state)

    def seed(self, seed: int) -> None:
        mx.random.seed(seed)

    # ---- checkpoint tensors (merge, soup) ----
    def open_safetensors(self, path: str) -> Callable[[str], mx.array]:
        return checkpoint_io.open_safetensors(path)

    def tensor_to_numpy(self, tensor: mx.array) -> np.ndarray:
        return checkpoint_io.to_numpy(tensor)

    def tensor_from_numpy(self, array: np.ndarray, like: mx.array) -> mx.array:
        return checkpoint_io.from_numpy(array, like)

    def is_float_tensor(self, tensor: mx.array) -> bool:
        return checkpoint_io.is_float(tensor)

    def save_safetensors(self, tensors: dict[str, mx.array], path: str) -> None:
        checkpoint_io.save_safetensors(tensors, path)
