"""``mmfuse export``: a run as one ONNX graph, refused unless it matches torch."""

from __future__ import annotations

import argparse
from pathlib import Path

from mmfuse.cli.checks import no_empty_folders, refuse_existing
from mmfuse.cli.flags import HelpFormatter


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export",
        help="export a run to one ONNX graph, checked against torch",
        formatter_class=HelpFormatter,
        description="Export a run to ONNX: model.onnx (token ids, attention mask, pixels -> logits, probs), the "
        "tokenizer and image preprocessing beside it, and export.json. The graph is run in onnxruntime against the "
        "torch model first (batch sizes 1, 2, 7; short and long texts) and refused if any probability differs by "
        "more than 1e-4 or any top-1 differs. Needs pip install 'mmfuse[export]'.",
    )
    p.add_argument("run", help="run directory made by mmfuse train")
    p.add_argument("--out", required=True, help="directory to write the export to, e.g. RUN/export")
    p.add_argument("--format", choices=("onnx",), default="onnx", help="export format")
    p.add_argument("--data", help="folder or manifest whose first rows the parity check uses (default: synthetic rows)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    p.set_defaults(fn=cmd_export)


def cmd_export(args) -> int:
    from mmfuse.inference.export import export_run  # deferred: imports torch

    if (Path(args.out) / "export.json").is_file():
        refuse_existing(args.out, "an earlier export (export.json, model.onnx)", args.overwrite)
    with no_empty_folders(args.out):
        info = export_run(args.run, args.out, data=args.data, fmt=args.format)
    parity = info["parity"]
    print(
        f"wrote {args.out}/model.onnx ({info['exporter']['name']} exporter, opset {info['exporter']['opset']}): "
        f"parity with torch passed, largest probability difference {parity['max_abs_diff']:.1e} over "
        f"{parity['rows_checked']} rows; see {args.out}/README.md"
    )
    return 0
