"""PyTorch MLP with an embedding per categorical column, behind the Learner interface."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, Self

import numpy as np
import pandas as pd

from pipelines.models.base import Learner, Monitor, log, resolve_device, valid_loss
from pipelines.progress import progress


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
    task design). `hidden=None` means layers of 64 and 32."""

    kind = "mlp"

    def __init__(self, categorical: dict[str, int] | None = None, hidden: list[int] | None = None,
                 embedding_dim: int = 4, epochs: int = 30, batch_size: int = 256, learning_rate: float = 3e-3,
                 patience: int = 5, random_state: int | None = 0, threads: int = 1, device: str = "auto",
                 task: str = "binary", n_classes: int | None = None) -> None:
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
        return (torch.from_numpy(numeric).to(self.device_), torch.from_numpy(codes).to(self.device_))

    def fit(self, X: Any, y: Any, X_valid: Any = None, y_valid: Any = None, monitor: Monitor | None = None) -> Self:
        X, y, X_valid, y_valid = self._prepare_fit(X, y, X_valid, y_valid, monitor)
        return self._train(X, y, X_valid, y_valid, monitor)

    def distill(self, X: Any, soft: np.ndarray, X_valid: Any = None, soft_valid: np.ndarray | None = None) -> Self:
        """Fit to a teacher's outputs (see Learner.distill): its probabilities are the targets of the same
        losses (binary cross-entropy on the positive class, cross-entropy on the class distribution), its
        values the regression targets; early stopping on the soft-label log loss."""
        X, soft, X_valid, soft_valid = self._prepare_distill(X, soft, X_valid, soft_valid)
        return self._train(X, soft, X_valid, soft_valid)

    def _train(self, X: pd.DataFrame, y: np.ndarray, X_valid: pd.DataFrame | None, y_valid: np.ndarray | None,
               monitor: Monitor | None = None) -> Self:  # y_valid is given whenever X_valid is (fit_inputs)
        """The training loop; y (and y_valid) are labels, or a teacher's probabilities (n, k) when distilling."""
        import torch

        self.device_ = resolve_device(self.device)
        log.info("mlp: device=%s", self.device_)
        torch.manual_seed(self._seed)
        torch.set_num_threads(self.threads)
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
        valid = (self._tensors(X_valid), y_valid) if X_valid is not None and y_valid is not None else None
        optim = torch.optim.Adam(self.net_.parameters(), lr=self.learning_rate)
        gen = torch.Generator().manual_seed(self._seed)
        best_loss, best_state, stale = np.inf, None, 0
        for epoch in progress(range(self.epochs), "mlp training", unit="epoch"):
            self.net_.train()
            for idx in torch.randperm(len(target), generator=gen).split(self.batch_size):
                idx = idx.to(self.device_)
                optim.zero_grad()
                loss_fn(self.net_(num[idx], codes[idx]), target[idx]).backward()
                optim.step()
            if valid is None:
                continue
            loss = valid_loss(valid[1], self._predict(*valid[0]))
            if monitor is not None:
                monitor(epoch + 1, loss)
            if loss < best_loss - 1e-5:
                best_loss, best_state, stale = loss, copy.deepcopy(self.net_.state_dict()), 0
            else:
                stale += 1
                if stale >= self.patience:
                    log.info("mlp: early stop at epoch %d (best valid log loss %.4f)", epoch, best_loss)
                    break
        if best_state is not None:
            self.net_.load_state_dict(best_state)
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

    def _predict(self, num: Any, codes: Any) -> np.ndarray:
        """The canonical output (pipelines.metrics): class probabilities (n, k) or values (n,)."""
        import torch

        self.net_.eval()
        with torch.no_grad():
            logits = self.net_(num, codes).double()
            task = self.task
            if task == "binary":
                p1 = torch.sigmoid(logits[:, 0])
                return torch.stack([1 - p1, p1], dim=1).cpu().numpy()
            if task == "multiclass":
                return torch.softmax(logits, dim=1).cpu().numpy()
            return (logits[:, 0] * self.y_std_ + self.y_mean_).cpu().numpy()

    def _output(self, X: pd.DataFrame) -> np.ndarray:
        return self._predict(*self._tensors(X[self.columns_]))

    def _state(self) -> dict[str, Any]:
        return {"device_": self.device_, "columns_": self.columns_, "y_mean_": self.y_mean_, "y_std_": self.y_std_,
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
