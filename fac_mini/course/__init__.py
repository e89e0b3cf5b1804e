"""Course tooling, apart from the ideas: the notebooks' self-checks (:mod:`.checks`), the generator of the student
notebooks (:mod:`.exercises`), plots and widgets (:mod:`.viz`) and the DRSR benchmark (:mod:`.bench`)."""
