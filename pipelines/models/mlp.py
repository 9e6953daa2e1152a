"""PyTorch MLP with an embedding per categorical column, behind the Learner interface."""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from pathlib import Path
from typing import Any, Self

import numpy as np
import pandas as pd

from pipelines.models.base import Learner, Monitor, log, resolve_device
from pipelines.progress import progress

BASE_BATCH = 256  # batch_size "auto": the batch of small tables, and the one learning_rate is given for,
STEPS = {"cpu": 200, "cuda": 50}  # growing to about rows / this (steps an epoch; a GPU takes fewer, larger ones)
MAX_BATCH = {"cpu": 4096, "cuda": 16384}  # up to this
PREDICT_CHUNK = 65536  # rows scored at once


def _build_net(n_numeric: int, cardinalities: dict[str, int], embedding_dim: int, hidden: list[int], outputs: int
               ) -> Any:
    import torch
    from torch import nn

    class TabularMLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embeddings = nn.ModuleList(nn.Embedding(card, embedding_dim) for card in cardinalities.values())
            layers: list[nn.Module] = []
            width = n_numeric + embedding_dim * len(cardinalities)
            for size in hidden:
                layers += [nn.Linear(width, size), nn.ReLU(), nn.Dropout(0.1)]
                width = size
            layers.append(nn.Linear(width, outputs))
            self.body = nn.Sequential(*layers)

        def forward(self, numeric: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
            parts = [numeric] + [emb(codes[:, i]) for i, emb in enumerate(self.embeddings)]
            return self.body(torch.cat(parts, dim=1))

    return TabularMLP()


def _autocast(device: str) -> Any:
    """bf16 autocast for the training steps on a GPU that has bf16 (its loss is taken in float32), else nothing."""
    import torch

    if device == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _device_loss(y: Any, output: Any) -> float:
    """valid_loss, computed where the tensors are: log loss of class indices or of a teacher's probabilities
    (clipped as valid_loss clips), or the mean squared error."""
    import torch

    if output.ndim == 2:
        logp = torch.log(output.clamp(1e-7, 1.0))
        if y.ndim == 2:
            return float(-(y.double() * logp).sum(dim=1).mean())
        return float(-logp.gather(1, y.long().view(-1, 1)).mean())
    return float(((y.double() - output) ** 2).mean())


def _int8(net: Any) -> Any:
    """`net` with int8 dynamically quantized Linear layers (torch.ao.quantization.quantize_dynamic, which
    PyTorch has deprecated in favour of torchao, not installed here; the deprecation warning is silenced)."""
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", UserWarning)
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(net, {torch.nn.Linear}, dtype=torch.qint8)


class MLPLearner(Learner):
    """A PyTorch MLP with an embedding per categorical column (see Learner for the estimator rules and the
    task design). `hidden=None` means layers of 64 and 32; `batch_size="auto"` picks the batch by rows and
    device (see _batch); `compile` trains through torch.compile; `autocast` trains in bf16 on a GPU."""

    kind = "mlp"

    def __init__(self, categorical: dict[str, int] | None = None, hidden: list[int] | None = None,
                 embedding_dim: int = 4, epochs: int = 30, batch_size: int | str = "auto",
                 learning_rate: float = 3e-3, patience: int = 5, random_state: int | None = 0, threads: int = 1,
                 device: str = "auto", task: str = "binary", n_classes: int | None = None,
                 compile: bool = False, autocast: bool = False) -> None:
        self.categorical = categorical
        self.hidden = hidden
        self.embedding_dim = embedding_dim
        self.epochs = epochs
        self.batch_size = batch_size
        self.learning_rate = learning_rate
        self.patience = patience
        self.random_state = random_state
        self.threads = threads
        self.device = device
        self.task = task
        self.n_classes = n_classes
        self.compile = compile
        self.autocast = autocast

    @property
    def _hidden(self) -> list[int]:
        return list(self.hidden or [64, 32])

    def _saved_params(self) -> dict[str, Any]:
        return {**super()._saved_params(), "hidden": self._hidden}

    @property
    def _outputs(self) -> int:
        """One logit (binary), one per class (multiclass, softmax), one value (regression)."""
        return len(self.classes_) if self.task == "multiclass" else 1

    def _net(self, n_columns: int) -> Any:
        return _build_net(n_columns - len(self._categorical), self._categorical, self.embedding_dim, self._hidden,
                          self._outputs)

    def _tensors(self, X: pd.DataFrame) -> tuple[Any, Any]:
        import torch

        cats = list(self._categorical)
        numeric = X.drop(columns=cats).to_numpy(dtype="float32")
        codes = X[cats].to_numpy(dtype="int64") if cats else np.zeros((len(X), 0), dtype="int64")
        # a read-only view (pandas copy-on-write) is copied: torch tensors are writable
        return tuple(torch.from_numpy(a if a.flags.writeable else a.copy()).to(self.device_)  # type: ignore[return-value]
                     for a in (numeric, codes))

    def fit(self, X: Any, y: Any, X_valid: Any = None, y_valid: Any = None, monitor: Monitor | None = None) -> Self:
        X, y, X_valid, y_valid = self._prepare_fit(X, y, X_valid, y_valid, monitor)
        return self._train(X, y, X_valid, y_valid, monitor)

    def distill(self, X: Any, soft: np.ndarray, X_valid: Any = None, soft_valid: np.ndarray | None = None) -> Self:
        """Fit to a teacher's outputs (see Learner.distill): its probabilities are the targets of the same
        losses (binary cross-entropy on the positive class, cross-entropy on the class distribution), its
        values the regression targets; early stopping on the soft-label log loss."""
        X, soft, X_valid, soft_valid = self._prepare_distill(X, soft, X_valid, soft_valid)
        return self._train(X, soft, X_valid, soft_valid)

    def _batch(self, rows: int) -> tuple[int, float]:
        """The batch size and learning rate: as set, or (batch_size "auto") a batch that grows with the rows
        and the device (256 on small tables, about rows / 200 up to 4,096 on a CPU, rows / 50 up to 16,384 on a
        GPU, a power of two), with the learning rate scaled by the square root of the batch over 256 (Adam's
        usual rule). On 1M rows x 30 that kept the validation log loss of batch 256 (0.3122 against 0.3125)."""
        if self.batch_size != "auto":
            return int(self.batch_size), float(self.learning_rate)
        steps, cap = STEPS[self.device_], MAX_BATCH[self.device_]
        batch = int(min(cap, max(BASE_BATCH, 2 ** round(math.log2(max(rows, 1) / steps)))))
        return batch, float(self.learning_rate) * math.sqrt(batch / BASE_BATCH)

    def _train(self, X: pd.DataFrame, y: np.ndarray, X_valid: pd.DataFrame | None, y_valid: np.ndarray | None,
               monitor: Monitor | None = None) -> Self:  # y_valid is given whenever X_valid is (fit_inputs)
        """The training loop; y (and y_valid) are labels, or a teacher's probabilities (n, k) when distilling.

        Everything stays on the device: the rows, their shuffled order (drawn there), the validation loss of
        every epoch and the best weights so far (copied in place, not deep-copied). On CUDA, Adam is fused (one
        kernel a step) and `autocast` runs the steps in bf16; `compile` runs them through torch.compile."""
        import torch

        self.device_ = resolve_device(self.device)
        batch, lr = self._batch(len(X))
        torch.manual_seed(self._seed)
        if self.device_ == "cpu":  # small steps gain nothing from many threads: about one per 1,024 rows
            torch.set_num_threads(max(1, min(self.threads, batch // 1024)))
        log.info("mlp: device=%s batch=%d lr=%.4g threads=%d", self.device_, batch, lr, torch.get_num_threads())
        self.columns_ = list(X.columns)
        self.net_ = self._net(X.shape[1]).to(self.device_)
        num, codes = self._tensors(X)
        # regression learns the standardized target (a scale-free loss); predictions are scaled back
        regression = self.task == "regression"
        self.y_mean_, self.y_std_ = (float(y.mean()), float(y.std() or 1.0)) if regression else (0.0, 1.0)
        if self.task == "multiclass":  # class indices, or class probabilities (torch takes either)
            target = torch.as_tensor(y.astype("float32" if y.ndim == 2 else "int64"), device=self.device_)
            loss_fn: Any = torch.nn.CrossEntropyLoss()
        else:
            values = y[:, 1] if y.ndim == 2 else y  # binary soft labels: the positive-class probability
            scaled = (values.astype("float64") - self.y_mean_) / self.y_std_
            target = torch.as_tensor(scaled.astype("float32"), device=self.device_).unsqueeze(1)
            loss_fn = torch.nn.BCEWithLogitsLoss() if self.task == "binary" else torch.nn.MSELoss()
        valid = None
        if X_valid is not None and y_valid is not None:
            valid = (*self._tensors(X_valid), torch.as_tensor(y_valid, device=self.device_))
        optim = torch.optim.Adam(self.net_.parameters(), lr=lr, fused=self.device_ == "cuda")  # one kernel a step
        step_net = self.net_
        if self.compile:
            step_net = torch.compile(self.net_, dynamic=False)
        autocast = _autocast(self.device_) if self.autocast else contextlib.nullcontext()
        gen = torch.Generator(device=self.device_).manual_seed(self._seed)
        best_loss, stale, n = np.inf, 0, len(target)
        best = {k: v.detach().clone() for k, v in self.net_.state_dict().items()}
        for epoch in progress(range(self.epochs), "mlp training", unit="epoch"):
            self.net_.train()
            order = torch.randperm(n, generator=gen, device=self.device_)
            for start in range(0, n, batch):
                idx = order[start:start + batch]
                optim.zero_grad(set_to_none=True)
                with autocast:
                    out = step_net(num[idx], codes[idx])
                loss_fn(out.float(), target[idx]).backward()
                optim.step()
            if valid is None:
                continue
            loss = _device_loss(valid[2], self._predict_tensor(valid[0], valid[1]))
            if monitor is not None:
                monitor(epoch + 1, loss)
            if loss < best_loss - 1e-5:
                best_loss, stale = loss, 0
                with torch.no_grad():
                    for k, v in self.net_.state_dict().items():
                        best[k].copy_(v)
            else:
                stale += 1
                if stale >= self.patience:
                    log.info("mlp: early stop at epoch %d (best valid %s %.4f)", epoch,
                             "squared error (standardized)" if self.task == "regression" else "log loss", best_loss)
                    break
        if valid is not None:
            self.net_.load_state_dict(best)
        self.net_.eval()
        return self

    @property
    def int8(self) -> bool:
        """Whether the Linear layers hold int8 weights (see `quantized`)."""
        return bool(getattr(self, "int8_", False))

    def quantized(self) -> MLPLearner:
        """A copy whose Linear layers are dynamically quantized to int8 (weights int8, activations quantized
        per batch); it predicts on the CPU, where PyTorch's int8 kernels are."""
        import torch

        learner = copy.deepcopy(self)
        learner.net_ = _int8(copy.deepcopy(self.net_).to("cpu").eval())
        learner.device, learner.device_, learner.int8_ = "cpu", "cpu", True
        learner.trained_on_ = getattr(self, "trained_on_", self.device_)
        torch.set_num_threads(self.threads)
        return learner

    def _predict_tensor(self, num: Any, codes: Any) -> Any:
        """The canonical output as a float64 tensor on the net's device, scored in chunks of PREDICT_CHUNK rows."""
        import torch

        self.net_.eval()
        parts = []
        with torch.no_grad():
            for start in range(0, len(num), PREDICT_CHUNK):
                logits = self.net_(num[start:start + PREDICT_CHUNK], codes[start:start + PREDICT_CHUNK]).double()
                if self.task == "binary":
                    p1 = torch.sigmoid(logits[:, 0])
                    parts.append(torch.stack([1 - p1, p1], dim=1))
                elif self.task == "multiclass":
                    parts.append(torch.softmax(logits, dim=1))
                else:
                    parts.append(logits[:, 0] * self.y_std_ + self.y_mean_)
        return torch.cat(parts) if parts else torch.zeros((0, 2) if self.task == "binary" else (0,))

    def _predict(self, num: Any, codes: Any) -> np.ndarray:
        """The canonical output (pipelines.metrics): class probabilities (n, k) or values (n,)."""
        return self._predict_tensor(num, codes).cpu().numpy()

    def _output(self, X: pd.DataFrame) -> np.ndarray:
        return self._predict(*self._tensors(X[self.columns_]))

    def _state(self) -> dict[str, Any]:
        return {"device_": getattr(self, "trained_on_", self.device_), "columns_": self.columns_,
                "y_mean_": self.y_mean_, "y_std_": self.y_std_,
                "int8_": self.int8}

    def _save_model(self, path: Path) -> None:
        import torch

        state = self.net_.state_dict()  # an int8 net is on the CPU, and its loader needs the state's _metadata
        torch.save(state if self.int8 else {k: v.cpu() for k, v in state.items()}, path / "model.pt")

    def _load_model(self, path: Path, state: dict[str, Any]) -> None:
        import torch

        self.columns_ = state["columns_"]
        self.n_features_in_ = len(self.columns_)
        self.y_mean_, self.y_std_ = state.get("y_mean_", 0.0), state.get("y_std_", 1.0)
        self.int8_ = bool(state.get("int8_", False))
        self.device_ = "cpu" if self.int8_ else resolve_device(self.device)
        self.net_ = self._net(len(self.columns_))
        if self.int8_:  # the int8 structure first: its state holds packed int8 weights
            self.net_ = _int8(self.net_.eval())
        with warnings.catch_warnings():  # unpickling int8 weights goes through torch's deprecated TypedStorage
            warnings.simplefilter("ignore", UserWarning)
            self.net_.load_state_dict(torch.load(path / "model.pt", map_location="cpu", weights_only=True))
        self.net_.to(self.device_).eval()
        self.trained_on_ = state["device_"]
