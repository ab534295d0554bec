"""Score images on Spark with a logged model (a user's tool, not a DVC stage):

    python src/score_spark.py --input DIR|GLOB|FILE.zip|URI --output FILE.csv|DIR.parquet
                              [--model models:/NAME@champion] [--master local[2]|spark://HOST:7077] [--threshold T]

Writes ``Image Name,Predicted Label,p_fake,error``, sorted by name: the labels ``src/predict.py`` gives the same
files, and each unreadable file's reason in ``error`` (the job goes on). Needs Java 17+ and pyspark.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's pipeline/

from pipeline import cli, tracking
from pipeline.errors import ConfigError
from pipeline.judge import registry
from pipeline.use import spark as spark_scoring


def main() -> None:
    parser = cli.stage_parser(__doc__)
    parser.add_argument("--input", required=True, help="a folder, a glob, a .zip, or a URI Spark reads (recursive)")
    parser.add_argument("--output", required=True, help="FILE.csv (one file), or a Parquet folder (any other name)")
    parser.add_argument("--model", help="an MLflow model URI (default: models:/<mlflow.model_name>@champion)")
    parser.add_argument("--master", default="local[2]", help="local[N] (this machine) or a cluster URL")
    parser.add_argument("--threshold", type=float, help="P(FAKE) at or above this is Fake (default: the model's own)")
    parser.add_argument("--unzip-to", help="where a .zip is extracted (default: a temporary folder; on a cluster, "
                                           "one its executors share)")
    args = parser.parse_args()
    params = cli.load_params(args)
    cli.check_threshold(args.threshold)
    model = args.model or f"models:/{params.mlflow.model_name}@{registry.CHAMPION}"
    if model.endswith((".keras", ".h5")):
        raise ConfigError(f"--model {model}: Spark scores MLflow models (models:/…, runs:/… or a saved model's "
                          "folder); score a .keras file with src/predict.py")
    spark_scoring.check_java()  # before anything slow
    with spark_scoring.source(args.input, args.unzip_to) as src:  # a bad --input fails before Spark starts
        if model.startswith(("models:/", "runs:/")):
            tracking.setup(params.mlflow)
        spark = spark_scoring.session(args.master)
        try:
            scored = spark_scoring.score(spark, src, model, args.threshold, spark_scoring.is_local(args.master))
            done = spark_scoring.write(spark, src, scored, args.output)
        finally:
            spark.stop()
    for name, reason in done.skipped[:20]:
        print(f"error {name}: {reason}", file=sys.stderr)
    if len(done.skipped) > 20:
        print(f"… and {len(done.skipped) - 20} more (the error column)", file=sys.stderr)
    print(f"score_spark: {done.images} images -> {args.output} ({done.fake} Fake, {len(done.skipped)} with an error)")


if __name__ == "__main__":
    cli.run(main)
