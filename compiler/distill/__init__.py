"""Distillation: knowledge, data and on-policy distillation, and QAT with a teacher."""
