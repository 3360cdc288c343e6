"""Recovery after conversion: training data (`data`, `synth`), distillation losses (`distill`), and the
fine-tuning run (`settings`, `finetune`, `trainers`, `report`)."""
