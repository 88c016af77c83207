// Command ctxbench measures Go's context package for bench/bench.c.
//
// It is a server: bench.c starts it (GOMAXPROCS=2) and sends one command per
// line on stdin, so that Go rounds interleave with ctx rounds in one run.
//
//	run <op> <n>       -> elapsed nanoseconds for n iterations of op
//	mem <kind> <count> -> heap bytes per live context (runtime.MemStats)
//	quit
//
// Tree ops ("tree<N>") time only the cancel of the root; building the tree
// and dropping it are not timed.  "idiom" times the caller's side of the
// goroutine-waits-on-Done idiom: WithCancel, go func(){<-Done(); f()}, cancel;
// the goroutines are drained untimed after the loop.
//
// With -json it instead runs every op with the method of bench.c (grow n to
// ~100 ms rounds, one warm-up round, median of 5) and prints one JSON object.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

type keyT struct{ _ byte }

var keys [33]keyT
var sink any
var isink int64

func valueChain(depth int) context.Context {
	c := context.Background()
	c = context.WithValue(c, &keys[0], &keys[0])
	for i := 1; i < depth; i++ {
		c = context.WithValue(c, &keys[i], &keys[i])
	}
	return c
}

func buildTree(root context.Context, n int) []context.CancelFunc {
	nodes := make([]context.Context, n+1)
	cancels := make([]context.CancelFunc, n+1)
	nodes[0] = root
	for i := 1; i <= n; i++ {
		nodes[i], cancels[i] = context.WithCancel(nodes[(i-1)/10])
	}
	return cancels
}

func run(op string, n int) int64 {
	bg := context.Background()
	switch {
	case op == "cancel":
		t := time.Now()
		for i := 0; i < n; i++ {
			_, cancel := context.WithCancel(bg)
			cancel()
		}
		return int64(time.Since(t))
	case op == "child":
		parent, pc := context.WithCancel(bg)
		defer pc()
		t := time.Now()
		for i := 0; i < n; i++ {
			_, cancel := context.WithCancel(parent)
			cancel()
		}
		return int64(time.Since(t))
	case op == "timeout":
		t := time.Now()
		for i := 0; i < n; i++ {
			_, cancel := context.WithTimeout(bg, time.Hour)
			cancel()
		}
		return int64(time.Since(t))
	case op == "err":
		c, cancel := context.WithCancel(bg)
		defer cancel()
		t := time.Now()
		var s int64
		for i := 0; i < n; i++ {
			if c.Err() != nil {
				s++
			}
		}
		isink += s
		return int64(time.Since(t))
	case strings.HasPrefix(op, "value"):
		d, _ := strconv.Atoi(op[5:])
		c := valueChain(d)
		k := &keys[0]
		var v any
		t := time.Now()
		for i := 0; i < n; i++ {
			v = c.Value(k)
		}
		el := int64(time.Since(t))
		sink = v
		return el
	case strings.HasPrefix(op, "tree"):
		size, _ := strconv.Atoi(op[4:])
		var total int64
		for i := 0; i < n; i++ {
			root, cancel := context.WithCancel(bg)
			cs := buildTree(root, size)
			t := time.Now()
			cancel()
			total += int64(time.Since(t))
			sink = cs
		}
		sink = nil
		return total
	case op == "idiom":
		var wg sync.WaitGroup
		var cnt int64
		wg.Add(n)
		t := time.Now()
		for i := 0; i < n; i++ {
			c, cancel := context.WithCancel(bg)
			go func() {
				<-c.Done()
				atomic.AddInt64(&cnt, 1)
				wg.Done()
			}()
			cancel()
		}
		el := int64(time.Since(t))
		wg.Wait()
		return el
	}
	fmt.Fprintf(os.Stderr, "ctxbench: unknown op %q\n", op)
	os.Exit(2)
	return 0
}

func heap() uint64 {
	var m runtime.MemStats
	runtime.GC()
	runtime.GC()
	runtime.ReadMemStats(&m)
	return m.HeapAlloc
}

// mem keeps count contexts (and their cancel functions, as a user must)
// alive and reports the heap growth per context.
func mem(kind string, count int) float64 {
	bg := context.Background()
	ctxs := make([]context.Context, count)
	cancels := make([]context.CancelFunc, count)
	before := heap()
	for i := 0; i < count; i++ {
		switch kind {
		case "cancel":
			ctxs[i], cancels[i] = context.WithCancel(bg)
		case "deadline":
			ctxs[i], cancels[i] = context.WithTimeout(bg, time.Hour)
		case "value":
			ctxs[i] = context.WithValue(bg, &keys[0], &keys[1])
		}
	}
	after := heap()
	runtime.KeepAlive(ctxs)
	runtime.KeepAlive(cancels)
	for _, c := range cancels {
		if c != nil {
			c()
		}
	}
	return float64(after-before) / float64(count)
}

func median(op string, target time.Duration) map[string]float64 {
	n := 1
	for {
		el := run(op, n)
		if time.Duration(el) >= target || n >= 1<<30 {
			break
		}
		grow := 2.0
		if el > 0 {
			grow = float64(target) * 1.2 / float64(el)
		}
		if grow < 2 {
			grow = 2
		}
		if grow > 10 {
			grow = 10
		}
		n = int(float64(n) * grow)
	}
	run(op, n) // warm-up
	var r []float64
	for i := 0; i < 5; i++ {
		r = append(r, float64(run(op, n))/float64(n))
	}
	sort.Float64s(r)
	return map[string]float64{"median": r[2], "min": r[0], "max": r[4], "iters": float64(n)}
}

func main() {
	jsonMode := flag.Bool("json", false, "run everything and print JSON")
	quick := flag.Bool("quick", false, "with -json: ~20 ms rounds")
	flag.Parse()
	if *jsonMode {
		target := 100 * time.Millisecond
		if *quick {
			target = 20 * time.Millisecond
		}
		out := map[string]any{"go": runtime.Version(), "gomaxprocs": runtime.GOMAXPROCS(0)}
		for _, op := range []string{"cancel", "child", "timeout", "err", "value1", "value8",
			"value32", "tree1000", "tree10000", "tree100000", "idiom"} {
			out[op] = median(op, target)
		}
		for _, k := range []string{"cancel", "value", "deadline"} {
			out["mem_"+k] = mem(k, 1000000)
		}
		b, _ := json.MarshalIndent(out, "", "  ")
		fmt.Println(string(b))
		return
	}
	in := bufio.NewScanner(os.Stdin)
	w := bufio.NewWriter(os.Stdout)
	fmt.Fprintf(w, "ready %s %d\n", runtime.Version(), runtime.GOMAXPROCS(0))
	w.Flush()
	for in.Scan() {
		f := strings.Fields(in.Text())
		if len(f) == 0 {
			continue
		}
		switch f[0] {
		case "run":
			n, _ := strconv.Atoi(f[2])
			fmt.Fprintf(w, "%d\n", run(f[1], n))
		case "mem":
			n, _ := strconv.Atoi(f[2])
			fmt.Fprintf(w, "%.1f\n", mem(f[1], n))
		case "quit":
			w.Flush()
			return
		}
		w.Flush()
	}
}
