"""Transport-free steps and policies over tensors and state dicts: the proposed method's serial and parallel
schedules, MD-GAN, FedGAN, aggregation rules, staleness and admission. Nothing here knows MQTT or bytes."""
