"""lorakit bench: step time and memory against PEFT."""
