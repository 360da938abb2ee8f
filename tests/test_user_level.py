"""User-level privacy (issue 16): the ULS sampler, micro-batches that keep users whole, the
clipped step against a float64 per-user oracle, ELS caps, and ``train --privacy-unit user``
end to end (card, accounting, audit)."""
import collections
import json
import math

import dp_accounting
import numpy as np
import pytest
import torch
from scipy import stats

import vaultkern as vk
from oracle import per_example_grads
from train_setup import PRIVATE_FIELDS, PUBLIC_CARD_KEYS, card_keys, run
from vaultkern.models import Decoder, get_config, per_sequence_loss
from vaultkern.privacy.user_sampling import (UserPoissonSampler, cap_rows_per_user,
                                             group_microbatches)
from vaultkern.run.batches import backward_in_microbatches

pytestmark = pytest.mark.usefixtures("one_thread")

USER_CARD_KEYS = {"privacy.user_sampling", "privacy.num_users", "privacy.max_sequences_per_user",
                  "privacy.user_level", "privacy.user_level.k", "privacy.user_level.epsilon",
                  "privacy.user_level.delta", "privacy.user_level.derivation"}


def users_with_counts(counts):
    """row_users for users 0.. with the given numbers of rows, rows of users interleaved."""
    users = np.repeat(np.arange(len(counts)), counts)
    return np.random.default_rng(0).permutation(users)


def test_uls_samples_users_at_rate_q_and_caps_their_rows():
    counts = [1, 2, 3, 5, 8, 13] * 10  # 60 users, 320 rows
    row_users = users_with_counts(counts)
    q, k, steps = 0.2, 3, 3000
    sampler = UserPoissonSampler(row_users, q, steps, max_rows_per_user=k, seed=3)
    user_hits, row_hits, sizes = np.zeros(60), np.zeros(len(row_users)), []
    for batch in sampler:
        groups = sampler.group_ids(batch).numpy()
        assert np.array_equal(groups, row_users[batch])
        assert np.all(np.diff(groups) >= 0)  # grouped by user, users ascending
        per_user = collections.Counter(groups.tolist())
        assert all(c == min(k, counts[u]) for u, c in per_user.items())  # capped, else whole
        user_hits[list(per_user)] += 1
        row_hits[batch] += 1
        sizes.append(len(per_user))
    # each user joins independently with probability q: counts ~ Binomial(steps, q)
    chi2 = ((user_hits - steps * q) ** 2 / (steps * q * (1 - q))).sum()
    assert stats.chi2.sf(chi2, 60) > 1e-4
    # users per step ~ Binomial(60, q) (mean 12, variance 9.6)
    assert abs(np.mean(sizes) - 12) < 6 * math.sqrt(9.6 / steps)
    assert 9.6 * 0.8 < np.var(sizes) < 9.6 * 1.2
    # a row of a user with n > k rows is used with probability q·k/n: its k rows are a
    # uniformly random subset (were they "the first k", the others would never appear)
    expected = np.array([steps * q * min(1.0, k / counts[u]) for u in row_users])
    chi2 = ((row_hits - expected) ** 2 / (expected * (1 - expected / steps))).sum()
    assert stats.chi2.sf(chi2, len(row_users)) > 1e-4


def test_uls_state_resumes_the_same_batches():
    row_users = users_with_counts([2, 4, 6] * 5)
    reference = list(UserPoissonSampler(row_users, 0.3, 8, 2, seed=5))
    sampler = UserPoissonSampler(row_users, 0.3, 8, 2, seed=5)
    it = iter(sampler)
    first = [next(it) for _ in range(3)]
    resumed = UserPoissonSampler(row_users, 0.3, 8, 2, seed=99)
    resumed.load_state_dict(sampler.state_dict())
    assert first + list(resumed) == reference
    with pytest.raises(ValueError, match="max_rows_per_user"):
        UserPoissonSampler(row_users, 0.3, 8, 3).load_state_dict(sampler.state_dict())


def test_micro_batches_never_split_a_user():
    groups = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 5])
    spans = group_microbatches(groups, 4)
    assert spans == [(0, 4), (4, 6), (6, 10), (10, 11)]
    assert group_microbatches(torch.tensor([], dtype=torch.long), 4) == []
    with pytest.raises(ValueError, match="user 3 has 4 rows"):
        group_microbatches(groups, 3)


def test_one_uls_step_is_the_per_user_clipped_sum():
    """The training loop's backward over a ULS batch (micro-batches of 3, users whole) =
    Σ_u min(1, C/‖Σ_{i∈u} g_i‖) Σ_{i∈u} g_i in float64, C at the median user norm."""
    torch.manual_seed(0)
    cfg = get_config("tiny", seq_len=8)
    model = Decoder(cfg).double()
    row_users = users_with_counts([1, 2, 3, 2, 1, 3])
    rows = torch.randint(3, 200, (len(row_users), 9))
    sampler = UserPoissonSampler(row_users, 0.7, 1, max_rows_per_user=2, seed=1)
    batch = sampler.sample_batch()
    groups = sampler.group_ids(batch)
    assert len(set(groups.tolist())) >= 3

    def loss(m, b):
        return per_sequence_loss(m(b[0][:, :-1]), b[0][:, 1:])
    grads = per_example_grads(model, (rows[batch],), loss)
    per_user = {}
    for g_i, u in zip(grads, groups.tolist()):
        acc = per_user.setdefault(u, {n: torch.zeros_like(g) for n, g in g_i.items()})
        for n, g in g_i.items():
            acc[n] += g
    norms = {u: math.sqrt(sum(float(g.square().sum()) for g in G.values())) for u, G in per_user.items()}
    C = float(np.median(list(norms.values())))
    want = {n: sum(min(1.0, C / (norms[u] + 1e-6)) * G[n] for u, G in per_user.items())
            for n in grads[0]}
    assert any(v > C * 1.01 for v in norms.values()) and any(v < C * 0.99 for v in norms.values())

    vk.patch(model, max_grad_norm=C, loss_reduction="sum")
    backward_in_microbatches(model, rows[batch], torch.ones(len(batch), dtype=torch.bool),
                             per_sequence_loss, 3, torch.device("cpu"), groups=groups)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[n], rtol=1e-6, atol=1e-10)


def test_els_keeps_at_most_m_rows_per_user_chosen_by_their_own_keys():
    row_users = users_with_counts([1, 5, 9, 2])
    keys = np.random.default_rng(1).random(len(row_users))
    kept = cap_rows_per_user(row_users, 3, keys)
    per_user = collections.Counter(row_users[kept].tolist())
    assert per_user == {0: 1, 1: 3, 2: 3, 3: 2}
    for u in range(4):  # the lowest keys of each user
        mine = np.nonzero(row_users == u)[0]
        assert set(kept) & set(mine) == set(mine[np.argsort(keys[mine])[:3]])
    # which rows a user keeps does not depend on another user's rows
    others = row_users != 0
    kept_without = cap_rows_per_user(row_users[others], 3, keys[others])
    assert set(np.nonzero(others)[0][kept_without]) == set(kept) - set(np.nonzero(~others)[0])


def eps_users(q, sigma, steps, delta):
    acc = dp_accounting.pld.PLDAccountant()
    acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma)), steps)
    return acc.get_epsilon(delta)


def test_train_privacy_unit_user_uls_end_to_end(tmp_path, config):
    out = tmp_path / "uls"
    summary = run(out, config, "--privacy-unit", "user", "--noise-multiplier", 1.0,
                  "--steps", 5, "--batch-size", 6, "--max-rows-per-user", 3,
                  "--epsilon-every", 5, "--delta", 1e-3)
    card = json.loads((out / "model_card.json").read_text())
    p = card["privacy"]
    users = p["num_users"]
    assert p["user_sampling"] == "uls" and p["dataset_size"] == users and 10 < users < 40
    assert p["sample_rate"] == pytest.approx(6 / users)
    assert p["privacy_unit"].startswith("one user") and "at most 3" in p["privacy_unit"]
    assert p["neighbouring_datasets"] == "add or remove one user (all of their records)"
    assert p["epsilon"] == pytest.approx(eps_users(6 / users, 1.0, 5, 1e-3), rel=1e-3)
    assert card_keys(card) <= PUBLIC_CARD_KEYS | USER_CARD_KEYS
    assert "add or remove one user" in (out / "MODEL_CARD.md").read_text()
    assert not set(PRIVATE_FIELDS) & set(p)
    # the audit runs on it and reports the exposure of canaries planted in one user's records
    from vaultkern.audit import audit_run
    report = audit_run(str(out), device="cpu", num_candidates=100, max_sequences=64,
                       memorization_samples=8, quiet=True)
    assert report["canaries"] and all("exposure" in c for c in report["canaries"])
    assert summary["status"] == "complete"


def test_train_privacy_unit_user_els_states_the_per_user_epsilon(tmp_path, config):
    out = tmp_path / "els"
    run(out, config, "--privacy-unit", "user", "--user-sampling", "els", "--max-rows-per-user",
        4, "--noise-multiplier", 1.0, "--steps", 4, "--epsilon-every", 4)
    p = json.loads((out / "model_card.json").read_text())["privacy"]
    user = p["user_level"]
    assert p["user_sampling"] == "els" and user["k"] <= 4
    assert p["privacy_unit"].startswith("one sequence") and f"k = {user['k']}" in p["privacy_unit"]
    # group privacy over k Poisson-sampled rows, composed directly with dp-accounting
    q, k = p["sample_rate"], user["k"]
    step = dp_accounting.dp_event.MixtureOfGaussiansDpEvent(
        1.0, list(range(k + 1)), [math.comb(k, j) * q ** j * (1 - q) ** (k - j) for j in range(k + 1)])
    acc = dp_accounting.pld.PLDAccountant(value_discretization_interval=1e-2)
    acc.compose(dp_accounting.SelfComposedDpEvent(step, 4))
    assert user["epsilon"] == pytest.approx(acc.get_epsilon(p["delta"]), rel=1e-3)
    assert user["epsilon"] > p["epsilon"]
    headline = (out / "MODEL_CARD.md").read_text().split("## Privacy")[0]  # both, per user first
    assert f"ε = {user['epsilon']:.3g}" in headline and f"ε = {p['epsilon']:.3g}" in headline
    # the run's data is the capped rows: what was trained on, the audit's members
    from vaultkern.data import PackedCorpus
    data = PackedCorpus.load(str(out / "data.pt"))
    assert len(data.train_rows) == p["dataset_size"]
    assert np.bincount(data.train_row_users.numpy()).max() <= 4


def test_user_level_refusals(tmp_path, config):
    with pytest.raises(ValueError, match="max-physical-batch-size"):
        run(tmp_path / "a", config, "--privacy-unit", "user", "--max-rows-per-user", 40)
    with pytest.raises(ValueError, match="needs DP"):
        run(tmp_path / "b", config, "--privacy-unit", "user", "--no-dp")
    text = tmp_path / "notes.txt"
    text.write_text("one\n\ntwo\n\nthree")
    with pytest.raises(ValueError, match="'user' field"):
        run(tmp_path / "c", config, "--privacy-unit", "user", "--data", str(text))


@pytest.mark.parametrize("physical", [None, 4])
def test_privacy_engine_user_level_step_is_the_per_user_clipped_sum(physical):
    """make_private(user_ids=, max_rows_per_user=): σ = 0, SGD(lr=1), a mean loss (Opacus
    style): the update is Σ_u clip_u Σ_{i∈u} g_i / B̄ (B̄ = expected users per step), the
    users' rows never straddle micro-batches, and ε is the user-level event's."""
    from torch.utils.data import DataLoader, TensorDataset
    from oracle import TinyDecoder, lm_loss
    torch.manual_seed(0)
    users = [i % 5 for i in range(20)]  # 5 users of 4 examples
    ids = torch.randint(0, 29, (20, 7))
    model = TinyDecoder(tied=True).double()
    reference = TinyDecoder(tied=True).double()
    reference.load_state_dict(model.state_dict())
    engine = vk.PrivacyEngine(accountant="pld")
    model, opt, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(TensorDataset(ids), batch_size=3), noise_multiplier=0.0,
        max_grad_norm=130.0, seed=2, user_ids=users, max_rows_per_user=3,
        max_physical_batch_size=physical)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    used = []
    for (rows,) in loader:
        used.append(rows)
        if len(rows):
            lm_loss(model, (rows,)).mean().backward()
        opt.step()
        opt.zero_grad()
        if opt.steps_taken == 1:
            break
    rows = torch.cat(used)
    row_of = {tuple(r.tolist()): i for i, r in enumerate(ids)}
    groups = [users[row_of[tuple(r.tolist())]] for r in rows]
    assert len(set(groups)) >= 2 and len(groups) > len(set(groups))
    grads = per_example_grads(reference, (rows,), lm_loss)
    per_user = {}
    for g_i, u in zip(grads, groups):
        acc = per_user.setdefault(u, {n: torch.zeros_like(g) for n, g in g_i.items()})
        for n, g in g_i.items():
            acc[n] += g
    norms = {u: math.sqrt(sum(float(g.square().sum()) for g in G.values())) for u, G in per_user.items()}
    for n, p in model.named_parameters():
        want = sum(min(1.0, 130.0 / (norms[u] + 1e-6)) * G[n] for u, G in per_user.items()) / 3
        torch.testing.assert_close(before[n] - p.detach(), want, rtol=1e-6, atol=1e-10)
    # C = 130 lies among the users' norms (118-154 here): some clipped, some not
    assert any(v > 130 * 1.01 for v in norms.values()) and any(v < 130 * 0.99 for v in norms.values())
    assert engine.sample_rate == pytest.approx(3 / 5) and engine.accountant.total_steps == 1


def test_every_packed_row_belongs_to_its_users_records():
    """The user of each training row (what ULS groups by) is the owner of the record the row
    came from: its text (≥ 20 characters, which no other record shares) is a piece of one of
    that user's records."""
    from vaultkern.data import PackedCorpus, builtin_user_corpus
    corpus = builtin_user_corpus(80, seed=3)
    data = PackedCorpus.from_corpus(corpus, 32)
    index = {u: i for i, u in enumerate(sorted(set(corpus.train_users), key=str))}
    texts = collections.defaultdict(list)
    for doc, u in zip(corpus.train_documents, corpus.train_users):
        texts[index[u]].append(doc)
    assert len(data.train_row_users) == len(data.train_rows)
    checked = 0
    for row, user in zip(data.train_rows, data.train_row_users.tolist()):
        piece = bytes(t for t in row.tolist() if t < 256).decode("ascii")
        if len(piece) >= 20:
            assert any(piece in doc for doc in texts[user]), (piece, user)
            checked += 1
    assert checked > len(data.train_rows) // 2
