"""`python -m comp.bench_gpu` (`make bench-gpu`): speed where the arithmetic dominates. A bert-base and a
DeBERTa-v3-base shape (random weights) and the config's encoder, at 256 and 512 tokens of the demo's rows (their
real length mix), trained and run by comp and by the loops a competitor would otherwise use: the Trainer with
length-grouped batches, the Trainer on flattened (padding-free) batches where the model takes them, a plain
eval loop and `pipeline`. Cold (first) and warm passes are timed apart. One prepared script: about ten minutes on
one GPU; on a CPU `--tiny` checks that it runs."""

from __future__ import annotations

import gc
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from comp import cli
from comp.artifacts import write_json
from comp.bench import _speed, comp_training_state, flop_params, hf_rows, matmul_peak, timed, trainer_for
from comp.config import Config, resolve_model_path
from comp.errors import CompError, run_cli
from comp.nn.batching import Rows, Truncation, tokenize, train_batches
from comp.nn.distributed import SINGLE, shard_batches
from comp.nn.hardware import resolve_device, resolve_precision
from comp.nn.loop import make_progress, predict, train_one_epoch
from comp.nn.model import build_model, hold_for_inference, load_tokenizer, pad_id
from comp.nn.state import seed_everything
from comp.tables.read import load_competition

# the shapes' configs: (class name, its keys); --tiny keeps the kind and shrinks it to 2 layers of width 32
SHAPES = {
    "bert-base": ("BertConfig", {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                                 "intermediate_size": 3072, "max_position_embeddings": 512}),
    "deberta-v3-base": ("DebertaV2Config", {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                                            "intermediate_size": 3072, "max_position_embeddings": 512,
                                            "relative_attention": True, "position_buckets": 256,
                                            "norm_rel_ebd": "layer_norm", "share_att_key": True,
                                            "pos_att_type": ["p2c", "c2p"], "position_biased_input": False,
                                            "max_relative_positions": -1, "type_vocab_size": 0}),
}
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
DEMO = "demo"  # the config's own encoder (model.name_or_path)


def model_folder(name: str, cfg: Config, tokenizer, tmp: Path, tiny: bool) -> Path:
    """A folder holding the model `name` (a shape with random weights, or the config's encoder) and its tokenizer."""
    if name == DEMO:
        return Path(resolve_model_path(cfg.model.name_or_path, cfg.root))
    import transformers

    kind, keys = SHAPES[name]
    config = getattr(transformers, kind)(**{**keys, **(TINY if tiny else {}), "vocab_size": len(tokenizer)})
    out = tmp / name
    transformers.AutoModel.from_config(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def comp_training(cfg: Config, rows: Rows, device, amp, tok_pad: int) -> tuple[dict, int]:
    """comp's epoch over the rows, twice: cold (the first pass, with its one-time costs) and warm; with
    train.packing as configured ("auto": packed where FlashAttention-2 runs; the JSON says which). Returns the
    timings and the encoder's parameters without embeddings (for the MFU)."""
    seed_everything(0)
    state, rt = comp_training_state(cfg, rows.meta.shape[1], int(rows.y.max()) + 1, device, amp, tok_pad)
    useful, out = int(rows.lengths.sum()), {}
    with make_progress(Console(quiet=True)) as progress:
        for phase, seed in (("cold", 0), ("warm", 1)):
            batches = train_batches(rows.lengths, cfg.train.batch_size, np.random.default_rng(seed))
            shares = shard_batches(batches, SINGLE, cfg.train.grad_accum_steps)
            seconds, mem = timed(device, lambda: train_one_epoch(state, rows, shares, rt, progress))  # noqa: B023
            out[phase] = _speed(len(rows), useful, seconds, mem)
    out["packed"] = state.model.packs
    return out, flop_params(state.model.encoder)


def trainer_training(path: Path, tokenizer, rows: Rows, cfg: Config, device, amp, tmp: Path, flat: bool) -> dict:
    """The Trainer, text only, cold and warm: length-grouped dynamic padding, or (flat) DataCollatorWithFlattening
    on a model loaded with FlashAttention-2, the Trainer's padding-free batches."""
    from transformers import DataCollatorWithFlattening

    if flat:
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            return {"skipped": "flattened batches need the flash-attn package on a CUDA GPU"}
    data = hf_rows(list(rows.tokens), rows.y)
    out = {}
    for phase in ("cold", "warm"):
        try:
            trainer = trainer_for(path, tokenizer, int(rows.y.max()) + 1, data, cfg.train.batch_size, amp, device,
                                  cfg.train.encoder_lr, tmp / f"trainer-{flat}-{phase}",
                                  collator=DataCollatorWithFlattening() if flat else None,
                                  attention="flash_attention_2" if flat else None)
        except (ImportError, ValueError) as exc:  # the model has no FlashAttention-2 path
            return {"skipped": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"}
        seconds, mem = timed(device, trainer.train)
        out[phase] = _speed(len(rows), int(rows.lengths.sum()), seconds, mem)
        del trainer
        gc.collect()
    return out


def inference(path: Path, tokenizer, cfg: Config, rows: Rows, texts: list[str], device, amp) -> dict:
    """comp.predict, a plain eval loop (AutoModelForSequenceClassification with its weights in the precision comp
    computes in, batch 128, dynamic padding, table order) and pipeline on that model, cold and warm each."""
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding, pipeline

    useful, n_classes, out = int(rows.lengths.sum()), int(rows.y.max()) + 1, {}
    model = hold_for_inference(build_model(cfg.model, rows.meta.shape[1], n_classes, root=cfg.root,
                                           tcfg=cfg.train).to(device).eval(), amp)  # as comp.predict loads a fold

    def comp_loop():
        predict(model, rows, cfg.train.eval_batch_size, pad_id(tokenizer), device, amp)
    out["comp"] = {phase: _speed(len(rows), useful, *timed(device, comp_loop)) for phase in ("cold", "warm")}
    model = None  # its memory back before the next model loads
    plain = AutoModelForSequenceClassification.from_pretrained(path, num_labels=n_classes,
                                                               dtype=amp or torch.float32).to(device).eval()
    collator = DataCollatorWithPadding(tokenizer)

    def plain_loop():
        with torch.inference_mode():
            for start in range(0, len(rows), 128):
                batch = collator([{"input_ids": t.tolist()} for t in rows.tokens[start:start + 128]])
                plain(**{k: v.to(device) for k, v in batch.items()}).logits.float().cpu()
    out["plain_loop"] = {phase: _speed(len(rows), useful, *timed(device, plain_loop)) for phase in ("cold", "warm")}
    classify = pipeline("text-classification", model=plain, tokenizer=tokenizer, device=device)
    out["pipeline"] = {phase: _speed(len(rows), useful, *timed(device, lambda: classify(
        texts, batch_size=128, truncation=True, max_length=cfg.model.max_length))) for phase in ("cold", "warm")}
    return out


def bench_one(cfg: Config, name: str, length: int, texts: list[str], y: np.ndarray, tokenizer, device, amp,
              tmp: Path, tiny: bool, train_rows: int) -> dict:
    path = model_folder(name, cfg, tokenizer, tmp, tiny)
    shape = {} if name == DEMO else {"name_or_path": str(path), "pooling": "cls", "gguf_file": ""}
    run = cfg.replace("model", max_length=length, **shape)
    tokens = tokenize(tokenizer, texts, Truncation.of(run.model))
    meta = np.zeros((len(texts), 0), dtype=np.float32)
    train = Rows(tokens[:train_rows], meta[:train_rows], y[:train_rows])
    test = Rows(tokens[train_rows:], meta[train_rows:], y[train_rows:])
    result = {"model": name, "max_length": length, "train_rows": len(train), "inference_rows": len(test),
              "useful_tokens_per_row": float(np.mean(train.lengths))}
    result["comp"], result["flop_params"] = comp_training(run, train, device, amp, pad_id(tokenizer))
    result["trainer"] = trainer_training(path, tokenizer, train, run, device, amp, tmp, flat=False)
    result["trainer_flat"] = trainer_training(path, tokenizer, train, run, device, amp, tmp, flat=True)
    result["inference"] = inference(path, tokenizer, run, test, texts[train_rows:], device, amp)
    return result


def add_mfu(result: dict, peak: float) -> None:
    """Useful-token MFU of every warm pass: 6 (training) or 2 (inference) × parameters × useful tokens/s ÷ peak."""
    params = result["flop_params"]
    for loop in ("comp", "trainer", "trainer_flat"):
        if "warm" in result[loop]:  # a skipped loop has no passes
            result[loop]["mfu"] = 6 * params * result[loop]["warm"]["useful_tokens_per_s"] / peak
    for loop in result["inference"].values():
        loop["mfu"] = 2 * params * loop["warm"]["useful_tokens_per_s"] / peak

    def warm(loop: dict) -> float:
        return loop["warm"]["samples_per_s"]
    inf = result["inference"]
    result["ratios"] = {"comp_over_trainer": warm(result["comp"]) / warm(result["trainer"]),
                        "comp_over_pipeline": warm(inf["comp"]) / warm(inf["pipeline"]),
                        "comp_over_plain_loop": warm(inf["comp"]) / warm(inf["plain_loop"])}


def run(cfg: Config, models: list[str], lengths: list[int], train_rows: int, inference_rows: int, tiny: bool,
        console: Console) -> dict:
    device = resolve_device(cfg.train)
    amp = resolve_precision(cfg.train, device)
    comp = load_competition(cfg, with_test=False)
    need = train_rows + inference_rows
    if len(comp.train) < need:
        raise CompError(f"the GPU bench needs {need} training rows, the config gives {len(comp.train)}: lower "
                        "--train-rows / --inference-rows or raise data.train_rows")
    order = np.random.default_rng(0).permutation(len(comp.train))[:need]
    texts, y = [comp.train_text[i] for i in order], comp.y[order]
    tokenizer = load_tokenizer(cfg.model, cfg.root)
    peak = matmul_peak(device, amp or torch.float32)
    out = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "precision": str(amp).replace("torch.", "") if amp else "fp32", "matmul_peak_tflops": peak / 1e12,
           "torch": torch.__version__, "batch_size": cfg.train.batch_size, "runs": []}
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            for length in lengths:
                console.print(f"{name} at {length} tokens ...")
                result = bench_one(cfg, name, length, texts, y, tokenizer, device, amp, Path(tmp), tiny, train_rows)
                add_mfu(result, peak)
                out["runs"].append(result)
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return out


def print_runs(out: dict, console: Console) -> None:
    table = Table(title=f"{out['device']}, {out['precision']}, matmul peak {out['matmul_peak_tflops']:.1f} TFLOP/s")
    for col in ("model", "tokens", "loop", "cold /s", "warm /s", "MFU", "peak CUDA MB"):
        table.add_column(col, justify="right")
    for r in out["runs"]:
        loops = {f"train {k}": r[k] for k in ("comp", "trainer", "trainer_flat")}
        loops |= {f"infer {k}": v for k, v in r["inference"].items()}
        for loop, v in loops.items():
            if "skipped" in v:
                table.add_row(r["model"], str(r["max_length"]), loop, "skipped", "", "", "")
                continue
            table.add_row(r["model"], str(r["max_length"]), loop, f"{v['cold']['samples_per_s']:.1f}",
                          f"{v['warm']['samples_per_s']:.1f}", f"{v['mfu']:.0%}",
                          str(v["warm"].get("peak_cuda_mb", "")))
    console.print(table)


def main(argv: list[str] | None = None) -> int:
    """GPU speed of comp against the Trainer, a plain loop and pipeline, on bert-base and DeBERTa-v3 shapes."""
    parser = cli.parser("comp.bench_gpu", main.__doc__)
    parser.add_argument("--models", default=f"bert-base,deberta-v3-base,{DEMO}",
                        help=f"comma-separated: {', '.join(SHAPES)}, {DEMO} (the config's encoder)")
    parser.add_argument("--lengths", default="256,512", help="comma-separated model.max_length values")
    parser.add_argument("--train-rows", type=int, default=1024, help="demo rows each training pass runs over")
    parser.add_argument("--inference-rows", type=int, default=1024, help="demo rows each inference pass predicts")
    parser.add_argument("--tiny", action="store_true", help="2-layer shapes of width 32: a quick check on a CPU")
    parser.add_argument("--out", default="reports/bench-gpu.json", help="where the JSON goes")
    args = parser.parse_args(argv)

    def body() -> int:
        models = args.models.split(",")
        unknown = [m for m in models if m not in (*SHAPES, DEMO)]
        if unknown:
            raise CompError(f"--models: unknown {unknown[0]!r}; choose from {', '.join(SHAPES)}, {DEMO}")
        try:
            lengths = [int(x) for x in args.lengths.split(",")]
        except ValueError:
            raise CompError(f"--lengths {args.lengths!r}: give token counts such as 256,512") from None
        if min(lengths) < 8 or args.train_rows < 1 or args.inference_rows < 1:
            raise CompError("--lengths must be at least 8 tokens and --train-rows / --inference-rows at least 1")
        console = cli.console(args.quiet)
        out = run(cli.load_config(args), models, lengths, args.train_rows, args.inference_rows, args.tiny, console)
        print_runs(out, console)
        write_json(Path(args.out), out)
        console.print(f"wrote {args.out}")
        console.print(json.dumps(out, indent=1), highlight=False)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
