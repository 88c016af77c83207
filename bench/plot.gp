# Plots for `make bench`:  gnuplot -e "datadir='build/bench'; outdir='bench'" bench/plot.gp
# tree_cancel.dat: size, then median/min/max in ms for ctx, Go and GLib.
# wake_latency.dat: fraction, then sorted wake latencies in us.
if (!exists("datadir")) datadir = "build/bench"
if (!exists("outdir")) outdir = "bench"

set terminal pngcairo size 900,560 noenhanced font ",11"
set grid
set key top left Left reverse

set output outdir."/tree_cancel.png"
set title "Cancelling a tree (fan-out 10): time of the root's cancel, median and min-max of 5 rounds"
set logscale xy
set xlabel "descendants"
set ylabel "ms"
set format x "%.0s%c"
set xrange [700:1400000]
plot datadir."/tree_cancel.dat" using 1:2:3:4 with yerrorlines lw 2 pt 7 title "ctx (ctx_cancel)", \
     ""                         using 1:5:6:7 with yerrorlines lw 2 pt 5 title "Go 1.19 (cancel(), GOMAXPROCS=2)", \
     ""                         using 1:8:9:10 with yerrorlines lw 2 pt 9 title "GLib (handler chain: g_cancellable_connect on the parent)"

unset logscale
set output outdir."/wake_latency.png"
set title "Wake latency: cancel / eventfd write -> waiter's poll or epoll_wait returns (CDF)"
set logscale x
set format x "%g"
set xrange [*:*]
set xlabel "us (log)"
set ylabel "fraction of wake-ups"
set yrange [0:1]
set key bottom right
plot datadir."/wake_latency.dat" using 2:1 with lines lw 2 title "ctx_cancel -> poll", \
     ""                          using 3:1 with lines lw 2 dt 2 title "raw eventfd write -> poll", \
     ""                          using 4:1 with lines lw 2 title "ctx_cancel -> epoll_wait", \
     ""                          using 5:1 with lines lw 2 dt 2 title "raw eventfd write -> epoll_wait"
