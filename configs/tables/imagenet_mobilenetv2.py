"""The paper's table for configs/imagenet_mobilenetv2.py: no-reg / l2 / l1 / STE-QAT@4 / KURE, 3 seeds.

Needs the TFDS data of that config (see README, "CIFAR-10 and ImageNet"); add
--only=no-reg/seed0,l1/seed0 (run names) to run a subset.

    python -m experiments.run_sweep --config=configs/tables/imagenet_mobilenetv2.py --workdir=$WORKDIR
    python -m experiments.make_tables --workdir=$WORKDIR
"""
from configs import imagenet_mobilenetv2
from configs.tables import methods

get_config, sweep = methods.paper_table(imagenet_mobilenetv2.get_config)
