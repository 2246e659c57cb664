r"""
downstream.py: benchmark accuracy of nanosynth checkpoints through lm-evaluation-harness, as the
paper reports it beside loss: zero-shot multiple-choice tasks (ARC-Easy, PIQA, SciQ), scored by the
harness's `acc`, for one model or an ensemble. Optional: needs lm-eval 0.4 (pip install
'lm-eval>=0.4,<0.5'); the rest of nanosynth does not.

    python evaluate.py downstream --tasks arc_easy,piqa,sciq out/runs/real/ckpt.pt
    python evaluate.py downstream --tasks arc_easy,piqa,sciq runs/sorted-s0/ckpt.pt runs/sorted-s1/ckpt.pt
    python evaluate.py downstream --include_path sample_data/tasks --tasks jargon_mc out/runs/real/ckpt.pt

How NanosynthLM (an lm_eval TemplateLM) scores a request (context, continuation):
  * tokens: the checkpoint's own tokenizer (the spec train.py stored with it), encode_ordinary.
  * BOS first: the model reads BOS + context + continuation, as every training document starts
    with BOS. (An empty context is BOS alone.) One document per request, so the causal mask is
    also what the document and megadoc masks would give.
  * left truncation: if BOS + context + continuation is longer than the model's context plus one,
    the oldest context tokens are cut (BOS stays first); the continuation is always scored whole.
  * the answer is (sum of log p(continuation token), is greedy); "is greedy" asks whether each
    continuation token is the argmax over the tokenizer's ids only, not the padding rows of the
    embedding (train.py pads the vocabulary to a multiple of 64).
  * several checkpoints are an ensemble: at every continuation token the members' probabilities
    are averaged (not their logits), as evaluate.py's ensemble losses do; log p and the argmax are
    those of the averaged distribution.
  Only log-likelihood requests are served: multiple-choice tasks. Generation and rolling
  (perplexity) tasks are refused with a message.

Output (evaluate.py downstream): per task the accuracy, its standard error (the harness's
acc_stderr) and the number of questions; their mean, and the average benchmark error 1 - mean
accuracy, the quantity the paper plots, with the standard error of the mean over tasks
(sqrt(sum se^2) / tasks). Where a task also defines acc_norm (the harness's accuracy with each
choice's log-likelihood divided by its length in bytes) it is shown beside, but the mean is of acc,
as the paper's. Printed as a table; --out_json writes the same as JSON.

Reads checkpoints written by train.py; lm_eval's named tasks download their data from the Hugging
Face Hub on first use (into its cache), tasks from --include_path read local files. Writes
--out_json only.
"""
import json
import math

import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM

from formats import atomic_open
from model import load_model
from tokenizer import load_tokenizer


def request_window(context, continuation, bos_id, block_size):
    """(input ids, target ids, n) for one request: BOS + context + continuation, cut from the left
    to block_size + 1 tokens with BOS kept first; the input is all of it but the last token, the
    targets all but BOS, and the last n = len(continuation) targets are the ones scored."""
    if context[:1] == [bos_id]:   # the harness's empty context is [BOS]
        context = context[1:]
    if not 0 < len(continuation) <= block_size:
        raise ValueError(f"a continuation of {len(continuation)} tokens cannot be scored in a context of "
                         f"{block_size} (it must have 1 to {block_size} tokens)")
    body = (context + continuation)[-block_size:]   # the targets; BOS + body[:-1] is the input
    return [bos_id] + body[:-1], body, len(continuation)


class NanosynthLM(TemplateLM):
    """lm_eval's model for one nanosynth checkpoint, or several as a probability-averaged
    ensemble. Members must share the tokenizer and context length."""

    def __init__(self, ckpt_paths, device="cpu", batch_size=16):
        super().__init__()
        self.models, spec, self.block_size = [], None, None
        for path in ckpt_paths:
            model, ckpt = load_model(path, device)
            tok = ckpt.get("tokenizer", "gpt2")
            if spec is None:
                spec, self.block_size = tok, model.config.block_size
            if (tok, model.config.block_size) != (spec, self.block_size):
                raise ValueError(f"{path}: ensemble members must share tokenizer and context "
                                 f"({tok!r}, {model.config.block_size} here; {spec!r}, {self.block_size} for the first)")
            self.models.append(model)
        self.enc, self.bos_id = load_tokenizer(spec)
        self.n_vocab = self.enc.n_vocab   # the real ids; the embedding may have padding rows above
        if any(m.config.vocab_size < self.n_vocab for m in self.models):
            raise ValueError(f"a checkpoint has fewer embedding rows than its tokenizer {spec!r} has ids ({self.n_vocab})")
        self._device, self.batch_size, self.tokenizer_spec = device, batch_size, spec

    @property
    def eot_token_id(self):
        return self.bos_id   # also the prefix of an empty context (TemplateLM.prefix_token_id)

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        return self.enc.encode_ordinary(string)

    def tok_decode(self, tokens, **kwargs):
        return self.enc.decode(tokens)

    @torch.no_grad()
    def continuation_logprobs(self, windows):
        """For each (input, targets, n) of request_window: the (n, n_vocab) log-probabilities of the
        (averaged) model at the n scored positions, float32 on the CPU. Rows are run in batches of
        similar length, right-padded (causal attention: padding after a row changes nothing in it)."""
        order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
        out = [None] * len(windows)
        for lo in range(0, len(order), self.batch_size):
            rows = order[lo: lo + self.batch_size]
            length = len(windows[rows[0]][0])
            x = torch.zeros(len(rows), length, dtype=torch.long)
            for r, i in enumerate(rows):
                x[r, : len(windows[i][0])] = torch.tensor(windows[i][0])
            x = x.to(self.device)
            running = None
            for model in self.models:
                # SDPA's causal kernel on every device: flex attention would be compiled again for each
                # new batch length, and one document per row needs no other mask
                logits, _ = model(x, attn_impl="sdpa")
                logp = [F.log_softmax(logits[r, len(windows[i][0]) - windows[i][2]: len(windows[i][0])], dim=-1)
                        [:, : self.n_vocab].cpu() for r, i in enumerate(rows)]
                running = logp if running is None else [torch.logaddexp(a, b) for a, b in zip(running, logp)]
            for i, lp in zip(rows, running):
                out[i] = lp - math.log(len(self.models))
        return out

    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        windows = [request_window(list(context), list(continuation), self.bos_id, self.block_size)
                   for _, context, continuation in requests]
        answers = []
        for (_, targets, n), lp in zip(windows, self.continuation_logprobs(windows)):
            cont = torch.tensor(targets[-n:])
            logprob = lp.gather(1, cont[:, None]).double().sum().item()
            answers.append((logprob, bool((lp.argmax(dim=-1) == cont).all())))
        for (strings, _, _), answer in zip(requests, answers):
            self.cache_hook.add_partial("loglikelihood", strings, answer)
        return answers

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError("nanosynth's lm_eval model scores multiple-choice tasks only "
                                  "(log-likelihood requests), not perplexity tasks")

    def generate_until(self, requests, disable_tqdm=False):
        raise NotImplementedError("nanosynth's lm_eval model scores multiple-choice tasks only "
                                  "(log-likelihood requests), not generation tasks")


def evaluate_tasks(ckpt_paths, tasks, include_path=None, batch_size=16, device="cpu", limit=None, num_fewshot=0,
                   include_defaults=True):
    """{"tasks": {name: {"acc", "acc_stderr", "n"}}, "mean_acc", "mean_acc_stderr",
    "average_benchmark_error", ...} of the checkpoints (one model, or their ensemble) on the named
    lm_eval tasks: the harness's own (include_defaults) and those in the folder include_path. An
    unknown task name is a ValueError."""
    import lm_eval
    from lm_eval.tasks import TaskManager
    lm = NanosynthLM(ckpt_paths, device, batch_size)   # first: a bad checkpoint fails before the task index is built
    manager = TaskManager(include_path=include_path, include_defaults=include_defaults)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"--tasks: unknown task(s) {', '.join(unknown)} (python -m lm_eval ls tasks lists them; "
                         "a task of your own: --include_path DIR)")
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=manager, num_fewshot=num_fewshot,
                                  limit=limit, log_samples=False, verbosity="WARNING")
    per_task = {}
    for name, result in out["results"].items():
        if "acc,none" not in result or name in out.get("groups", {}):
            continue   # a task without acc, or a group's line (its tasks have their own)
        per_task[name] = {"acc": result["acc,none"], "acc_stderr": result["acc_stderr,none"],
                          "n": out["n-samples"][name]["effective"]}
        if "acc_norm,none" in result:   # length-normalized, where the task defines it (not what the paper reports)
            per_task[name].update(acc_norm=result["acc_norm,none"], acc_norm_stderr=result["acc_norm_stderr,none"])
    if not per_task:
        raise ValueError(f"--tasks {','.join(tasks)}: no task reported acc (multiple-choice tasks do)")
    accs = [t["acc"] for t in per_task.values()]
    mean = sum(accs) / len(accs)
    mean_se = math.sqrt(sum(t["acc_stderr"] ** 2 for t in per_task.values())) / len(accs)
    return {"checkpoints": list(ckpt_paths), "tokenizer": lm.tokenizer_spec, "num_fewshot": num_fewshot,
            "limit": limit, "tasks": per_task, "mean_acc": mean, "mean_acc_stderr": mean_se,
            "average_benchmark_error": 1 - mean}


def results_table(results):
    from evaluate import markdown_table
    cell = lambda t, key: f"{t[key]:.4f}" if key in t else ""
    rows = [[name, t["n"], cell(t, "acc"), cell(t, "acc_stderr"), f"{1 - t['acc']:.4f}", cell(t, "acc_norm"),
             cell(t, "acc_norm_stderr")] for name, t in results["tasks"].items()]
    rows.append(["mean", "", f"{results['mean_acc']:.4f}", f"{results['mean_acc_stderr']:.4f}",
                 f"{results['average_benchmark_error']:.4f}", "", ""])
    return markdown_table(["task", "questions", "acc", "± se", "error (1 - acc)", "acc_norm", "± se"], rows)


def write_json(path, results):
    with atomic_open(path, "w") as f:
        json.dump(results, f, indent=1)
