"""E2E-QP on chat data: the assistant's tokens are the only labels (checked on a hand-made conversation
against the text of the replies and against a cross-entropy computed by hand), padding changes nothing,
bad data and templates are refused in one line, and a chat E2E-QP run works end to end."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import one_process_env, tiny_model
from eqat_dist.data.chat import IGNORE, ChatExamples, chat_examples, load_conversations, tokenized_conversation
from eqat_dist.data.text import DataError

ROOT = Path(__file__).resolve().parents[1]
RUN = str(ROOT / "launch" / "run.py")
CONVERSATION = [{"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4."}]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from eqat_dist.models.loading import bundled_model_dir
    return AutoTokenizer.from_pretrained(str(bundled_model_dir()))


def test_only_the_assistant_replies_and_their_end_of_turn_are_labels(tokenizer):
    ids, labels = tokenized_conversation(tokenizer, CONVERSATION)
    assert len(ids) == len(labels)
    labelled = [t for t, lab in zip(ids, labels) if lab != IGNORE]
    assert all(lab in (IGNORE, t) for t, lab in zip(ids, labels))
    # SmolLM2's ChatML template: each reply is followed by <|im_end|> and a newline, both the reply's
    replies = tokenizer("Hello! How can I help?<|im_end|>\n", add_special_tokens=False).input_ids + \
        tokenizer("4.<|im_end|>\n", add_special_tokens=False).input_ids
    assert labelled == replies
    # the system prompt the template adds, the user turns and the role headers are not trained on
    runs, inside = [], False
    for lab in labels:
        if (lab != IGNORE) != inside:
            runs.append(lab != IGNORE)
            inside = lab != IGNORE
    assert runs == [True, False, True]  # two replies, two contiguous runs of labels
    text = tokenizer.decode([t for t, lab in zip(ids, labels) if lab == IGNORE])
    assert "Hi there" in text and "What is 2+2?" in text and "<|im_start|>assistant\n" in text
    assert "Hello!" not in text


def test_the_models_loss_is_the_cross_entropy_of_the_assistant_tokens_alone(tokenizer):
    """The loss E2E-QP trains on, against a hand computation: the mean negative log-likelihood of each
    labelled token given the tokens before it; the user's tokens do not enter it."""
    from transformers import AutoModelForCausalLM

    from eqat_dist.models.loading import bundled_model_dir
    model = AutoModelForCausalLM.from_pretrained(str(bundled_model_dir()), dtype=torch.float32).eval()
    data = chat_examples_from([CONVERSATION], tokenizer, seqlen=64)
    batch = data.batch(torch.tensor([0]), "cpu")
    with torch.no_grad():
        out = model(**batch)
    logp = torch.log_softmax(out.logits[0].float(), -1)
    ids, labels = batch["input_ids"][0], batch["labels"][0]
    picked = [-logp[t - 1, ids[t]] for t in range(1, len(ids)) if labels[t] != IGNORE]
    assert len(picked) == int((labels[1:] != IGNORE).sum()) > 0
    assert out.loss.item() == pytest.approx(torch.stack(picked).mean().item(), rel=1e-5)
    every_token = torch.stack([-logp[t - 1, ids[t]] for t in range(1, len(ids))]).mean()
    assert abs(out.loss.item() - every_token.item()) > 0.1  # the plain causal-LM loss differs


def chat_examples_from(conversations, tokenizer, seqlen, tmp=None):
    path = Path(tmp or os.environ.get("TMPDIR", "/tmp")) / f"chat-{random.randrange(1 << 30)}.jsonl"
    path.write_text("".join(json.dumps({"messages": c}) + "\n" for c in conversations))
    try:
        return chat_examples(tokenizer, str(path), seqlen, len(conversations))
    finally:
        path.unlink()


def test_padding_after_a_conversation_changes_none_of_its_losses(tokenizer):
    """A short conversation batched with a longer one is padded after its end, with no attention mask:
    under causal attention its logits (so its loss terms) are those it has alone."""
    torch.manual_seed(0)
    model = tiny_model("llama", layers=2, vocab=49152).eval()
    longer = CONVERSATION + [{"role": "user", "content": "And 3+3? Say it in words please."},
                             {"role": "assistant", "content": "Six, the sum of three and three."}]
    data = chat_examples_from([CONVERSATION, longer], tokenizer, seqlen=128)
    short = int(data.lengths.argmin())
    both = data.batch(torch.tensor([0, 1]), "cpu")
    alone = data.batch(torch.tensor([short]), "cpu")
    assert both["input_ids"].shape[1] == int(data.lengths.max()) > alone["input_ids"].shape[1]
    with torch.no_grad():
        padded = model(input_ids=both["input_ids"]).logits[short, :alone["input_ids"].shape[1]]
        single = model(input_ids=alone["input_ids"]).logits[0]
    assert torch.allclose(padded, single, atol=1e-5)
    assert (both["labels"][short, alone["input_ids"].shape[1]:] == IGNORE).all()


def test_conversations_are_cut_at_seqlen_and_one_with_no_reply_left_is_dropped(tokenizer):
    long_question = [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "Yes."}]
    data = chat_examples_from([CONVERSATION, long_question], tokenizer, seqlen=48)
    assert len(data) == 1 and data.input_ids.shape == (1, 48) and int(data.lengths[0]) <= 48
    with pytest.raises(DataError, match="no conversation .* keeps an assistant reply within `e2e_seqlen` 48"):
        chat_examples_from([long_question], tokenizer, seqlen=48)


@pytest.mark.parametrize("record, message", [
    ({"text": "hi"}, "record 1 has no 'messages' field"),
    ({"messages": [{"role": "user", "content": "hi"}]}, "no assistant message"),
    ({"messages": [{"role": "bot", "content": "hi"}]}, "needs a 'role'"),
    ({"messages": []}, "non-empty list"),
])
def test_bad_chat_records_are_refused_naming_the_record(tmp_path, record, message):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(DataError, match=message):
        load_conversations(str(path))


def test_a_template_that_rewrites_earlier_turns_is_refused(tokenizer):
    import copy

    odd = copy.deepcopy(tokenizer)
    odd.chat_template = ("{{ messages|length }} turns\n{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n"
                         "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(DataError, match="rewrites earlier turns"):
        tokenized_conversation(odd, CONVERSATION)
    odd.chat_template = None
    with pytest.raises(DataError, match="has no chat template"):
        tokenized_conversation(odd, CONVERSATION)


def test_the_bundled_chat_set_is_two_question_conversations_from_sciq(tokenizer):
    conversations = load_conversations("sciq-chat")
    assert len(conversations) > 400
    assert all([t["role"] for t in c] == ["user", "assistant"] * 2 for c in conversations)
    data = chat_examples(tokenizer, "sciq-chat", seqlen=256, count=8, seed=0)
    assert isinstance(data, ChatExamples) and len(data) == 8
    share = (data.labels != IGNORE).sum() / data.lengths.sum()
    assert 0.2 < share < 0.9  # replies are a good part of each row, not all of it


@pytest.mark.slow
def test_chat_e2e_run_trains_the_scales_on_the_bundled_chat_set(tmp_path, bundled_rtn_w2):
    """E2E-QP of the bundled instruct model's RTN export on `sciq-chat`, end to end (one process,
    ZeRO-3 with offload): the loss falls over repeated conversations, only scales change."""
    from conftest import BUNDLED_EVAL, export_tensors

    common = ["--model", "smollm2-135m", "--wbits", "2", "--group-size", "64", *BUNDLED_EVAL]
    rtn = bundled_rtn_w2
    out = tmp_path / "chat"
    done = subprocess.run([sys.executable, RUN, *common, "--phase", "e2e", "--from", str(rtn), "--output", str(out),
                           "--e2e-data", "sciq-chat", "--e2e-train-size", "4", "--e2e-seqlen", "128",
                           "--e2e-global-batch", "4", "--e2e-micro-batch", "2", "--e2e-epochs", "4", "--e2e-lr", "2e-3",
                           "--e2e-warmup", "0"], env=one_process_env(), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "4 conversations from 'sciq-chat' (chat template; the loss on the assistant's" in done.stdout
    results = json.loads((out / "results.json").read_text())
    losses = results["e2e"]["losses"]
    assert len(losses) == 4 and losses[-1] < 0.95 * losses[0], losses
    before, after = export_tensors(rtn), export_tensors(out)
    assert all(torch.equal(before[k], after[k]) for k in before if not k.endswith(".scales"))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.endswith(".scales"))


@pytest.mark.slow
def test_chat_data_problems_are_refused_before_any_work(tmp_path):
    from transformers import AutoTokenizer

    from eqat_dist.models.loading import bundled_model_dir

    plain = tmp_path / "plain"  # a model whose tokenizer has no chat template
    tiny_model("llama", layers=2, vocab=49152).save_pretrained(plain)
    tok = AutoTokenizer.from_pretrained(str(bundled_model_dir()))
    tok.chat_template = None
    tok.save_pretrained(plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "only a question"}]}) + "\n")
    base = ["--wbits", "2", "--group-size", "32", "--epochs", "0", "--eval-datasets", "", "--zeroshot-tasks", "",
            "--skip-fp-eval", "--no-tensorboard"]
    for model, data, message in ((str(plain), "sciq-chat", "has no chat template"),
                                 ("smollm2-135m", str(bad), "record 1: no assistant message"),
                                 ("smollm2-135m", str(tmp_path / "missing.jsonl"), "does not exist")):
        out = tmp_path / f"out-{random.randrange(1 << 20)}"
        done = subprocess.run([sys.executable, RUN, "--model", model, *base, "--output", str(out),
                               "--e2e-data", data], env=one_process_env(), capture_output=True, text=True, timeout=300)
        lines = [line for line in done.stderr.splitlines() if line.startswith("eqat-dist")]
        assert done.returncode == 2 and len(lines) == 1 and "error: --e2e-data:" in lines[0] and message in lines[0], \
            done.stderr[-2000:]
        assert not out.exists()
