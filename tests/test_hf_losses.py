"""DPTrainer's per-example losses: the right one for each task, and each the per-example
form of the loss the model computes itself from labels= (equal when every row has as many
labelled targets, where the model's batch mean is the mean of per-example means)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from vaultkern.hf import losses  # noqa: E402
from vaultkern.hf.losses import per_example_loss_for  # noqa: E402

V = 40


def _bert(cls, **kw):
    cfg = transformers.BertConfig(vocab_size=V, hidden_size=16, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=24,
                                  hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **kw)
    torch.manual_seed(0)
    return cls(cfg).double()


def _t5():
    cfg = transformers.T5Config(vocab_size=V, d_model=16, d_kv=4, d_ff=24, num_layers=1,
                                num_heads=2, decoder_start_token_id=0, pad_token_id=0,
                                relative_attention_num_buckets=8, dropout_rate=0.0)
    torch.manual_seed(0)
    return transformers.T5ForConditionalGeneration(cfg).double()


def _shifts_inline(name):
    """Blenderbot and M2M-100 (NLLB's architecture) shift the labels inside their forward:
    no prepare_decoder_input_ids_from_labels (DPTrainer refused them before)."""
    def make():
        kw = dict(vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=1,
                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=24,
                  decoder_ffn_dim=24, max_position_embeddings=32, dropout=0.0, pad_token_id=0,
                  bos_token_id=1, eos_token_id=2, decoder_start_token_id=2,
                  encoder_layerdrop=0.0, decoder_layerdrop=0.0, attention_dropout=0.0)
        cfg = getattr(transformers, f"{name}Config")(**kw)
        torch.manual_seed(0)
        return getattr(transformers, f"{name}ForConditionalGeneration")(cfg).double()
    return make


def _llama():
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=24,
                                   num_hidden_layers=1, num_attention_heads=2)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(cfg).double()


g = torch.Generator().manual_seed(0)
IDS = torch.randint(3, V, (3, 6), generator=g)
CASES = {
    "causal": (_llama, losses.per_example_lm_loss, IDS.clone()),
    "seq2seq": (_t5, losses.per_example_seq2seq_loss, torch.randint(3, V, (3, 4), generator=g)),
    "seq2seq-blenderbot": (_shifts_inline("Blenderbot"), losses.per_example_seq2seq_loss,
                           torch.randint(3, V, (3, 4), generator=g)),
    "seq2seq-m2m100": (_shifts_inline("M2M100"), losses.per_example_seq2seq_loss,
                       torch.randint(3, V, (3, 4), generator=g)),
    "tokens": (lambda: _bert(transformers.BertForTokenClassification, num_labels=5),
               losses.per_example_token_loss, torch.randint(0, 5, (3, 6), generator=g)),
    "classes": (lambda: _bert(transformers.BertForSequenceClassification, num_labels=3),
                losses.per_example_classification_loss, torch.tensor([0, 2, 1])),
    "regression": (lambda: _bert(transformers.BertForSequenceClassification, num_labels=1),
                   losses.per_example_classification_loss,
                   torch.randn(3, generator=g, dtype=torch.float64)),
    "multi-label": (lambda: _bert(transformers.BertForSequenceClassification, num_labels=3,
                                  problem_type="multi_label_classification"),
                    losses.per_example_classification_loss,
                    torch.randint(0, 2, (3, 3), generator=g).double()),
}


@pytest.mark.parametrize("task", list(CASES))
def test_loss_is_chosen_by_task_and_averages_to_the_models_own(task):
    make, loss_fn, labels = CASES[task]
    model = make()
    assert per_example_loss_for(model) is loss_fn
    inputs = {"input_ids": IDS, "attention_mask": torch.ones_like(IDS), "labels": labels}
    per_example = loss_fn(model, inputs)
    assert per_example.shape == (3,)
    own = model(**inputs).loss
    assert torch.allclose(per_example.mean().double(), own.double(), rtol=1e-6, atol=0)


def test_peft_wrapped_classifier_gets_the_classification_loss():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(_bert(transformers.BertForSequenceClassification, num_labels=3),
                                peft.LoraConfig(task_type="SEQ_CLS", r=2,
                                                target_modules=["query", "value"]))
    assert per_example_loss_for(model) is losses.per_example_classification_loss


def test_unknown_model_asks_for_a_loss():
    with pytest.raises(ValueError, match="per_example_loss=fn"):
        per_example_loss_for(torch.nn.Linear(2, 2))


def test_m2m100_seq2seq_loss_is_clipped_exactly():
    """What DPTrainer does with M2M-100 (NLLB's architecture), against the float64 oracle."""
    from hf_zoo import assert_exact
    ids = torch.randint(3, V, (3, 6), generator=torch.Generator().manual_seed(1))
    ids[:, -1] = 2
    labels = torch.randint(3, V, (3, 4), generator=torch.Generator().manual_seed(2))
    labels[1, -1] = -100

    def loss(m, b):
        return losses.per_example_seq2seq_loss(m, {"input_ids": b[0], "labels": b[1]})

    assert_exact(_shifts_inline("M2M100")().train(), (ids, labels), loss)


def _bart(cls):
    cfg = transformers.BartConfig(vocab_size=V, d_model=16, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2,
                                  encoder_ffn_dim=24, decoder_ffn_dim=24, max_position_embeddings=32,
                                  dropout=0.0, num_labels=3)
    torch.manual_seed(0)
    return cls(cfg).double()


@pytest.mark.parametrize("cls,loss_fn", [
    ("BartForSequenceClassification", losses.per_example_classification_loss),
    ("BartForQuestionAnswering", losses.per_example_qa_loss),
    ("BertForQuestionAnswering", losses.per_example_qa_loss)])
def test_head_decides_the_loss_and_it_averages_to_the_models_own(cls, loss_fn):
    """An encoder-decoder with a classification or QA head gets that head's loss (BART's got
    the seq2seq loss before, which fed its class labels to the decoder); extractive QA
    averages its start and end cross-entropies, as the model does."""
    model = _bart(getattr(transformers, cls)) if cls.startswith("Bart") else _bert(
        getattr(transformers, cls))
    assert per_example_loss_for(model) is loss_fn
    ids = IDS.clone()
    ids[:, -1] = model.config.eos_token_id if cls.startswith("Bart") else ids[:, -1]
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if loss_fn is losses.per_example_qa_loss:
        inputs.update(start_positions=torch.tensor([0, 2, 4]), end_positions=torch.tensor([1, 3, 5]))
    else:
        inputs["labels"] = torch.tensor([0, 2, 1])
    per_example = loss_fn(model, inputs)
    assert per_example.shape == (3,)
    assert torch.allclose(per_example.mean().double(), model(**inputs).loss.double(), rtol=1e-6)


def test_question_answering_loss_is_clipped_exactly():
    from hf_zoo import assert_exact
    ids = torch.randint(3, V, (3, 7), generator=torch.Generator().manual_seed(1))
    b = (ids, torch.tensor([0, 2, 9]), torch.tensor([3, 5, 6]))  # 9: outside, ignored

    def loss(m, b):
        return losses.per_example_qa_loss(m, {"input_ids": b[0], "start_positions": b[1],
                                              "end_positions": b[2]})

    assert_exact(_bert(transformers.BertForQuestionAnswering).train(), b, loss)


@pytest.mark.parametrize("with_positions", [False, True])
def test_multiple_choice_loss_averages_to_the_models_own_and_is_clipped_exactly(with_positions):
    """[B, choices, T] inputs, which the model flattens to B·choices rows (example-major).
    BERT's default position ids, a [1, T] buffer that every row shares, are expanded to
    those B·choices rows, not to the B examples (torch's broadcasting error before)."""
    from hf_zoo import assert_exact
    model = _bert(transformers.BertForMultipleChoice, num_labels=1)  # num_labels plays no part
    assert per_example_loss_for(model) is losses.per_example_multiple_choice_loss
    ids = torch.randint(3, V, (3, 4, 5), generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([0, 3, 1])
    inputs = {"input_ids": ids, "labels": labels}
    assert torch.allclose(losses.per_example_multiple_choice_loss(model, inputs).mean().double(),
                          model(**inputs).loss.double(), rtol=1e-6)

    def loss(m, b):
        extra = {"position_ids": torch.arange(5).expand(b[0].shape)} if with_positions else {}
        return losses.per_example_multiple_choice_loss(
            m, {"input_ids": b[0], "labels": b[1], **extra})

    assert_exact(model.train(), (ids, labels), loss)
