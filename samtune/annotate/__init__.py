"""The human in the loop: a local web annotator to review proposals, fix them with clicks and add objects
(:mod:`samtune.annotate.server`), on SAM's interactive loop (:mod:`samtune.annotate.session`), with every decision
saved as the project's own formats (:mod:`samtune.annotate.store`)."""
