#!/bin/bash
# usage: bench/same_run_cases.sh DEST -- the four runs of docs/benchmarks.md (issue 21) into DEST/{a,b,c,d};
# run it with two versions of the code, then: python bench/same_run.py D1/a D2/a D1/b D2/b D1/c D2/c D1/d D2/d
set -x
D=$1; mkdir -p $D
cd "$(dirname "$0")/.." && . .venv/bin/activate
export DS_ACCELERATOR=cpu
COMMON="--model smollm2-135m --wbits 2 --group-size 64 --seqlen 128 --quant-lr 2e-2 --weight-lr 2e-3 --eval-datasets wiki --eval-seqlen 256 --eval-max-windows 2 --zeroshot-tasks piqa --zeroshot-limit 8"
OMP_NUM_THREADS=2 eqat-dist $COMMON --output $D/a --overwrite --epochs 1 --train-size 8 --val-size 2 --e2e-train-size 4 --e2e-seqlen 128 --e2e-global-batch 2 --e2e-micro-batch 1 --e2e-lr 2e-4 > $D/a.log 2>&1; echo "a rc $?"
OMP_NUM_THREADS=1 mpiexec -n 2 eqat-dist $COMMON --output $D/b --overwrite --epochs 1 --train-size 8 --val-size 2 --e2e-epochs 0 --skip-fp-eval > $D/b.log 2>&1; echo "b rc $?"
OMP_NUM_THREADS=2 eqat-dist $COMMON --output $D/c --overwrite --epochs 0 --e2e-epochs 0 --wbits 3 --export-dtype bfloat16 --skip-fp-eval --no-tensorboard > $D/c.log 2>&1; echo "c rc $?"
OMP_NUM_THREADS=2 eqat-dist $COMMON --output $D/d --overwrite --phase eval --from $D/a --skip-fp-eval > $D/d.log 2>&1; echo "d rc $?"
OMP_NUM_THREADS=1 mpiexec -n 2 eqat-dist $COMMON --output $D/e --overwrite --epochs 1 --train-size 8 --val-size 2 --e2e-epochs 0 --skip-fp-eval --student-input student > $D/e.log 2>&1; echo "e rc $?"
OMP_NUM_THREADS=1 mpiexec -n 2 eqat-dist $COMMON --output $D/f --overwrite --epochs 1 --train-size 8 --val-size 2 --e2e-epochs 0 --skip-fp-eval --student-input teacher --activations disk > $D/f.log 2>&1; echo "f rc $?"
