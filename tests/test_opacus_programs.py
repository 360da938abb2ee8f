"""Opacus programs, written the way Opacus' examples and tutorials write them, run with the
Opacus import lines swapped for vaultkern's and nothing else changed (issue 14).

Each program is run twice: with vaultkern, whose Poisson sampler draws the batches (they
are recorded on the way), and with Opacus 1.6, whose sampler replays those same batches.
With σ = 0 (make_private_with_epsilon: its calibrated σ, noise drawn as zeros on both
sides) the trained weights agree to float precision, relative to how far they moved.
"""
import contextlib
import sys
import types
import warnings

import pytest
import torch

import opacus
from opacus.utils.uniform_sampler import UniformWithReplacementSampler

from vaultkern.privacy import DPOptimizer
from vaultkern.privacy.sampling import PoissonBatchSampler

# The only lines that differ between the Opacus and the vaultkern version of a program.
IMPORTS = {
    "from opacus import PrivacyEngine": "from vaultkern import PrivacyEngine",
    "from opacus.utils.batch_memory_manager import BatchMemoryManager":
        "from vaultkern.privacy import BatchMemoryManager",
    "from opacus.validators import ModuleValidator": "from vaultkern.privacy import ModuleValidator",
}

COMMON = '''
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset
from opacus import PrivacyEngine
'''

PROGRAMS = {}

# Opacus' MNIST example (examples/mnist.py), on synthetic 12x12 images; its network with a
# BatchNorm, which ModuleValidator.fix swaps for a GroupNorm (Opacus' CIFAR-10 tutorial).
PROGRAMS["mnist_cnn"] = COMMON + '''
from opacus.validators import ModuleValidator

torch.manual_seed(0)
images, targets = torch.randn(64, 1, 12, 12), torch.randint(0, 10, (64,))
train_loader = DataLoader(TensorDataset(images, targets), batch_size=16)


class SampleConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 4, 2, padding=3)
        self.bn = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 4, 2)
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.conv1(x)))
        x = F.max_pool2d(x, 2, 1)
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2, 1)
        x = x.view(-1, 16)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


model = SampleConvNet()
errors = ModuleValidator.validate(model, strict=False)
assert len(errors) == 1  # the BatchNorm
model = ModuleValidator.fix(model)
assert not ModuleValidator.validate(model, strict=False)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
privacy_engine = PrivacyEngine(secure_mode=False)
model, optimizer, train_loader = privacy_engine.make_private(
    module=model, optimizer=optimizer, data_loader=train_loader,
    noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=1.0)
criterion = nn.CrossEntropyLoss()
for epoch in range(1, 3):
    model.train()
    losses = []
    for data, target in train_loader:
        optimizer.zero_grad()
        output = model(data)
        loss = criterion(output, target)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
'''

# Opacus' char-LSTM name classification example, on random "names".
PROGRAMS["char_lstm"] = COMMON + '''
from opacus.layers import DPLSTM

torch.manual_seed(0)
VOCAB_SIZE, MAX_LEN = 30, 9
names = torch.randint(1, VOCAB_SIZE, (48, MAX_LEN))
languages = torch.randint(0, 4, (48,))
train_loader = DataLoader(TensorDataset(names, languages), batch_size=12)


class CharNNClassifier(nn.Module):
    def __init__(self, embedding_size, hidden_size, output_size, num_lstm_layers=1,
                 bidirectional=False, vocab_size=VOCAB_SIZE):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_size)
        self.lstm = DPLSTM(embedding_size, hidden_size, num_layers=num_lstm_layers,
                           bidirectional=bidirectional, batch_first=True)
        self.out_layer = nn.Linear(hidden_size, output_size)

    def forward(self, x, hidden=None):
        x = self.embedding(x)  # -> [B, T, D]
        x, _ = self.lstm(x, hidden)  # -> [B, T, H]
        x = x[:, -1, :]  # -> [B, H]
        return self.out_layer(x)  # -> [B, C]


model = CharNNClassifier(16, 24, 4, num_lstm_layers=2)
criterion = nn.CrossEntropyLoss()
optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
privacy_engine = PrivacyEngine(secure_mode=False)
model, optimizer, train_loader = privacy_engine.make_private(
    module=model, optimizer=optimizer, data_loader=train_loader,
    noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=1.5)
for epoch in range(2):
    for x, y in train_loader:
        logits = model(x)
        loss = criterion(logits, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
'''

# Opacus' BERT fine-tuning tutorial: only the last encoder layer, the pooler and the
# classifier are trained; AdamW; the loss from the model's outputs.
PROGRAMS["bert_frozen"] = COMMON + '''
from transformers import BertConfig, BertForSequenceClassification

torch.manual_seed(0)
config = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=32, max_position_embeddings=16, num_labels=3,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
model = BertForSequenceClassification(config)
input_ids = torch.randint(1, 50, (40, 10))
attention_mask = torch.ones_like(input_ids)
attention_mask[::3, 7:] = 0  # some padded sequences
token_type_ids = torch.zeros_like(input_ids)
labels = torch.randint(0, 3, (40,))
train_dataloader = DataLoader(TensorDataset(input_ids, attention_mask, token_type_ids, labels),
                              batch_size=10)

trainable_layers = [model.bert.encoder.layer[-1], model.bert.pooler, model.classifier]
for p in model.parameters():
    p.requires_grad = False
for layer in trainable_layers:
    for p in layer.parameters():
        p.requires_grad = True

optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, eps=1e-8)
privacy_engine = PrivacyEngine(secure_mode=False)
model, optimizer, train_dataloader = privacy_engine.make_private(
    module=model, optimizer=optimizer, data_loader=train_dataloader,
    noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=0.1, poisson_sampling=True)
for epoch in range(1, 3):
    model.train()
    for step, batch in enumerate(train_dataloader):
        optimizer.zero_grad()
        inputs = {"input_ids": batch[0], "attention_mask": batch[1],
                  "token_type_ids": batch[2], "labels": batch[3]}
        outputs = model(**inputs)  # output = loss, logits, hidden_states, attentions
        loss = outputs[0]
        loss.backward()
        optimizer.step()
'''

# GPT-2 fine-tuning with ghost clipping (Opacus' fast-gradient-clipping tutorial): the
# criterion make_private returns, per-sequence losses through shape=; token and position
# embeddings (and with them the tied head) frozen.
PROGRAMS["gpt2_ghost"] = COMMON + '''
from transformers import GPT2Config, GPT2LMHeadModel

torch.manual_seed(0)
config = GPT2Config(vocab_size=61, n_embd=16, n_layer=2, n_head=4, n_positions=32,
                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
model = GPT2LMHeadModel(config)
model.transformer.wte.weight.requires_grad = False
model.transformer.wpe.weight.requires_grad = False
tokens = torch.randint(0, 61, (32, 12))
train_loader = DataLoader(TensorDataset(tokens), batch_size=8)
optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
criterion = nn.CrossEntropyLoss(ignore_index=-100)
privacy_engine = PrivacyEngine(secure_mode=False)
model, optimizer, criterion, train_loader = privacy_engine.make_private(
    module=model, optimizer=optimizer, data_loader=train_loader, criterion=criterion,
    noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=1.0, grad_sample_mode="ghost")
for epoch in range(2):
    for (batch,) in train_loader:
        labels = batch.clone()
        labels[:, :2] = -100  # the prompt does not count
        logits = model(input_ids=batch).logits[:, :-1]
        loss = criterion(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                         shape=logits.shape)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
'''

# make_private_with_epsilon (Opacus' README): σ calibrated for the target.
PROGRAMS["with_epsilon"] = COMMON + '''
torch.manual_seed(0)
features, targets = torch.randn(60, 8), torch.randint(0, 3, (60,))
data_loader = DataLoader(TensorDataset(features, targets), batch_size=15)
model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
privacy_engine = PrivacyEngine()
model, optimizer, data_loader = privacy_engine.make_private_with_epsilon(
    module=model, optimizer=optimizer, data_loader=data_loader, target_epsilon=8.0,
    target_delta=1e-3, epochs=3, max_grad_norm=0.5)
criterion = nn.CrossEntropyLoss()
for epoch in range(3):
    for x, y in data_loader:
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        optimizer.step()
epsilon = privacy_engine.get_epsilon(1e-3)
'''

# BatchMemoryManager (Opacus' CIFAR-10 tutorial): logical batches of 32 on average, physical
# ones of at most 8; the optimizer steps once per logical batch.
PROGRAMS["batch_memory_manager"] = COMMON + '''
from opacus.utils.batch_memory_manager import BatchMemoryManager

torch.manual_seed(0)
features, targets = torch.randn(96, 10), torch.randint(0, 4, (96,))
train_loader = DataLoader(TensorDataset(features, targets), batch_size=32)
model = nn.Sequential(nn.Linear(10, 24), nn.ReLU(), nn.LayerNorm(24), nn.Linear(24, 4))
optimizer = torch.optim.SGD(model.parameters(), lr=0.3, momentum=0.5)
privacy_engine = PrivacyEngine()
model, optimizer, train_loader = privacy_engine.make_private(
    module=model, optimizer=optimizer, data_loader=train_loader,
    noise_multiplier=NOISE_MULTIPLIER, max_grad_norm=0.8)
criterion = nn.CrossEntropyLoss()
physical_batches = 0
for epoch in range(2):
    with BatchMemoryManager(data_loader=train_loader, max_physical_batch_size=8,
                            optimizer=optimizer) as memory_safe_data_loader:
        for images, target in memory_safe_data_loader:
            optimizer.zero_grad()
            loss = criterion(model(images), target)
            loss.backward()
            optimizer.step()
            physical_batches += 1
'''


def vaultkern_version(source: str) -> str:
    for theirs, ours in IMPORTS.items():
        source = source.replace(theirs, ours)
    return source


@contextlib.contextmanager
def recorded(batches):
    """vaultkern's Poisson sampler as it is, its batches noted. The programs pass no seed, so
    the engine would draw one from os.urandom: a fixed one instead makes the float32 rounding
    differences against Opacus (which depend on the batches) the same on every run."""
    import vaultkern.privacy.engine as engine
    original, original_seed = PoissonBatchSampler.sample_batch, engine.shared_random_seed

    def sample_batch(self):
        batch = original(self)
        batches.append(batch)
        return batch
    PoissonBatchSampler.sample_batch = sample_batch
    engine.shared_random_seed = lambda: 20261201
    try:
        yield
    finally:
        PoissonBatchSampler.sample_batch = original
        engine.shared_random_seed = original_seed


@contextlib.contextmanager
def replayed(batches):
    """Opacus' Poisson sampler yielding the recorded batches."""
    original, pending = UniformWithReplacementSampler.__iter__, iter(batches)

    def replay(self):
        for _ in range(self.steps):
            yield next(pending)
    UniformWithReplacementSampler.__iter__ = replay
    try:
        yield
    finally:
        UniformWithReplacementSampler.__iter__ = original


@contextlib.contextmanager
def noise_drawn_as_zeros():
    """For a σ > 0 program: every noise draw is 0 on both sides (the rest of the step,
    σ included, unchanged), so that the weights can be compared."""
    import opacus.optimizers.optimizer as opacus_optimizer
    original_noise, original_std = opacus_optimizer._generate_noise, DPOptimizer.noise_std
    opacus_optimizer._generate_noise = lambda std, reference, *a, **k: torch.zeros_like(reference)
    DPOptimizer.noise_std = property(lambda self: 0.0)
    try:
        yield
    finally:
        opacus_optimizer._generate_noise, DPOptimizer.noise_std = original_noise, original_std


def run(source: str, noise_multiplier: float = 0.0) -> dict:
    # a real module, so that classes the program defines pickle (Opacus' ModuleValidator.fix
    # clones the model through torch.save)
    program = types.ModuleType("opacus_program")
    program.NOISE_MULTIPLIER = noise_multiplier
    sys.modules[program.__name__] = program
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # secure_mode=False notices, Opacus' own warnings
            exec(compile(source, "<opacus program>", "exec"), program.__dict__)
    finally:
        del sys.modules[program.__name__]
    return program.__dict__


def weights(namespace: dict) -> dict:
    # Opacus' GradSampleModule wraps the model as ._module; vaultkern's model._module is
    # the model itself (no wrapper)
    model = namespace["model"]
    model = getattr(model, "_module", model)  # (before make_private: the plain model)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def initial_weights(source: str) -> dict:
    """The program's model before training (everything up to make_private)."""
    head = source.split("privacy_engine = PrivacyEngine(")[0]
    return weights(run(head.replace("from opacus import PrivacyEngine", "")))


def relative_differences(ours: dict, theirs: dict, start: dict) -> dict:
    """‖ours − theirs‖ / ‖theirs − start‖ per trained parameter (exactly equal if frozen)."""
    out = {}
    for name, p in theirs.items():
        moved = float((p - start[name]).norm())
        if moved == 0.0:
            assert torch.equal(ours[name], p), name
            continue
        out[name] = float((ours[name] - p).norm()) / moved
    return out


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_program_runs_unchanged_and_matches_opacus(name):
    source = PROGRAMS[name]
    ours_source = vaultkern_version(source)
    changed = [(a, b) for a, b in zip(source.splitlines(), ours_source.splitlines()) if a != b]
    assert changed and all(a in IMPORTS and IMPORTS[a] == b for a, b in changed)

    batches = []
    zero_noise = noise_drawn_as_zeros() if name == "with_epsilon" else contextlib.nullcontext()
    with zero_noise:
        with recorded(batches):
            ours = run(ours_source)
        assert batches
        with replayed(batches):
            theirs = run(source)
    differences = relative_differences(weights(ours), weights(theirs), initial_weights(source))
    assert differences, "nothing trained"
    # BERT's attention key bias has true gradient 0 (softmax is invariant to a shift of all
    # of a query's scores): both sides hold rounding noise there, which AdamW's
    # normalisation turns into lr-sized steps in arbitrary directions, so it is not compared
    differences = {n: d for n, d in differences.items() if not n.endswith("self.key.bias")}
    tolerance = 1e-4 if name == "bert_frozen" else 1e-5  # AdamW divides by sqrt(v): looser
    assert max(differences.values()) <= tolerance, differences

    if name == "with_epsilon":
        sigma_ours = ours["optimizer"].noise_multiplier
        sigma_theirs = theirs["optimizer"].noise_multiplier
        # PLD (vaultkern) and PRV (Opacus) calibrate σ to within a few percent of each other
        assert sigma_ours == pytest.approx(sigma_theirs, rel=0.05)
        assert 0.99 * 8.0 <= ours["epsilon"] <= 8.0
    if name == "batch_memory_manager":
        assert ours["physical_batches"] == theirs["physical_batches"] > 6
        assert ours["privacy_engine"].accountant.total_steps == 6
