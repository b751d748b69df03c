"""The `dualmoe` command and launcher glue for deepspeed and accelerate."""
