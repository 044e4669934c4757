# The three LRMIN/LRMAX rules on the same 8,000-image subset, 6 epochs, batch 512, seed 0, on 2 CPU cores.
# The LRs are what lr_find suggested on the full training set at batch 512 (seed 0; see ../lr_find/):
#   minimum 0.0525, steep 0.0832, valley 0.00631, slide 0.209
# slide:   LRMIN = valley,     LRMAX = slide     (the rule train.choose_lrs applies)
# minimum: LRMIN = valley,     LRMAX = minimum
# valley:  LRMIN = valley/10,  LRMAX = valley    (fastai's default suggestion as the peak)
for cfg in "slide 0.0063095735 0.2089296132" "minimum 0.0063095735 0.0524807453" "valley 0.00063095735 0.0063095735"; do
  set -- $cfg
  python experiments/run.py --data data/cifar10 --subset 8000 --epochs 6 --bs 512 --seed 0 \
     --lr-min $2 --lr-max $3 --out runs/lr_rule/$1 > results/lr_rule/$1.log 2>&1
done
