"""Recovery after conversion: training data (`data`; `synth` samples the teacher with the engines of `sampler`
and its `packed_gqa` attention), distillation losses (`distill`), and the fine-tuning run (`settings`,
`finetune`, `trainers`, `report`)."""
