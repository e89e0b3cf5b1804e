"""Training machinery shared by every recipe: the loop (:mod:`.loop`), the checkpoint store (:mod:`.store`), the
seal of the shipped data (:mod:`.seal`), the command-line rules (:mod:`.cli`), the metrics (:mod:`.metrics`), and
the recipes that make the shipped checkpoints (:mod:`.m0`, :mod:`.speech_tokenizer`, :mod:`.srh_study`)."""
