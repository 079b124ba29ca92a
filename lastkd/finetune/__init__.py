"""Fine-tuning the VideoMAE V2 teacher on a dataset's RGB clips (the official recipe), as a library.

``config`` (the job's typed config), ``clips`` (which files, labels, and the training/test
sampling), ``optim`` (layer-wise lr decay, schedule, mixup/cutmix), ``loop`` (train, resume,
evaluate, publish). Imports the teacher's model and video pipeline and the skeleton side's NTU
naming and split rules; nothing imports it but the command line.
"""
