"""App-side helpers shared by run_solver.py and the experiments: flag definitions (one
place for every flag the apps share, with one meaning), options built from them, the
terminal progress display and signal handling. The library (`dpjax`) never imports
this package and defines no flags."""
