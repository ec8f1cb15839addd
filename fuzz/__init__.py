"""Coverage-guided fuzzing (atheris) of the parsers that read bytes from the network.

python -m fuzz run                   # 10^6 inputs per parser (the documented run)
python -m fuzz run --seconds 20      # a short run, as the test suite does
python -m fuzz run --parser httphead --runs 5000000
python -m fuzz seed                  # rebuild the seed corpus from real clients

Each parser's summary line gives the inputs run, the coverage, the RSS growth after the
warm-up and the crashes with their reproducers. A crash, a hang or RSS growth past
``RSS_GROWTH_LIMIT`` fails the run (exit status 1).
"""
