"""NTU RGB+D as files: sample names, the ``.skeleton`` format (joints, colour-pixel positions) and
the standard train/val protocols. Shared by the student's data pipeline and the teacher's
fine-tuning (so their splits are one rule); imports nothing of lastkd."""
