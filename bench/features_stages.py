"""Where feature extraction at 32x32 loses against the matmul ceiling: ResNet50 timed stage by stage.

    python bench/features_stages.py          # 2,048 images, batch 256

Each prefix of the backbone (input -> end of conv1 + max pool, conv2, ..., conv5) is compiled like
``pipeline.model.forward_fn`` and timed (warm-up, then the median of 3); a stage's time is the difference of two
prefixes. Its GFLOP are the Conv2D multiply-adds x2 of its layers (``bench.features.conv_gflops`` of each prefix).
One JSON line per stage, with its feature-map size, share of the FLOPs and of the time, and GFLOP/s against the
float32 matmul ceiling measured in the same run.
"""
from __future__ import annotations

import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.common import emit, loadavg, repeat  # noqa: E402
from bench.features import conv_gflops, make_cfg, matmul_gflops  # noqa: E402

STAGE_ENDS = ("pool1_pool", "conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out")


def label(end: str) -> str:
    return "conv1+pool" if end == "pool1_pool" else end.split("_")[0]


def main() -> None:
    import keras
    import numpy as np
    import tensorflow as tf

    from pipeline.model import backbone_of, build_model

    ceiling = matmul_gflops(4096, "float32", repeats=5)["gflops"]
    backbone = backbone_of(build_model(make_cfg(32), 0.0, seed=42))
    x = tf.constant(np.random.default_rng(0).normal(0, 60, (2048, 32, 32, 3)).astype(np.float32))
    batch = 256

    prev_s, prev_gflop, rows = 0.0, 0.0, []
    for end in STAGE_ENDS:
        prefix = keras.Model(backbone.input, backbone.get_layer(end).output)
        fn = tf.function(lambda t, m=prefix: m(t, training=False),
                         input_signature=[tf.TensorSpec((None, 32, 32, 3), tf.float32)])
        load = loadavg()
        secs = repeat(lambda: [fn(x[i : i + batch]) for i in range(0, len(x), batch)][-1].numpy(), repeats=3)
        total_s = statistics.median(secs)
        gflop = conv_gflops(prefix)
        stage_s, stage_gflop = max(total_s - prev_s, 1e-9), gflop - prev_gflop
        rows.append((end, stage_s, stage_gflop))
        emit("resnet50_stage", load, stage=label(end), output_hw=list(prefix.output.shape[1:3]),
             channels=prefix.output.shape[-1], gflop_per_image=round(stage_gflop, 4),
             ms_per_image=round(1e3 * stage_s / len(x), 4), gflops=round(stage_gflop * len(x) / stage_s, 1),
             fraction_of_ceiling=round(stage_gflop * len(x) / stage_s / ceiling, 3), ceiling_gflops=ceiling,
             images=len(x), batch_size=batch)
        prev_s, prev_gflop = total_s, gflop
    total_s, total_gflop = prev_s, prev_gflop
    emit("resnet50_stages_total", None, gflop_per_image=round(total_gflop, 4),
         images_per_s=round(len(x) / total_s, 1),
         fraction_of_ceiling=round(total_gflop * len(x) / total_s / ceiling, 3),
         share_of_time={label(e): round(s / total_s, 3) for e, s, _ in rows},
         share_of_flops={label(e): round(g / total_gflop, 3) for e, _, g in rows})


if __name__ == "__main__":
    main()
