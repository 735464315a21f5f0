from attn_tracer.cli import main

main()
