"""The service: process layout, start-up recovery, the assembler loop, shutdown, doctor."""
