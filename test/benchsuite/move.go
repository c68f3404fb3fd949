package benchsuite

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	goredis "github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/broker"
)

// The client's side of a move: a writer per instance at the address its
// binding gave (the source's, a forwarder to the target after the
// cutover), counting what Redis acknowledged, and the longest time it
// went without an acknowledgement while the broker moved that instance.

// Each writer INCRs writerCounters counters in turn and XADDs to one
// stream after each round, pausing writerEvery after an acknowledged
// command; after a failed one it reconnects after writerRetry.
const (
	writerCounters = 4
	writerEvery    = time.Millisecond
	writerRetry    = time.Millisecond
	writerStream   = "bench:stream"
)

func writerCounter(k int) string { return "bench:counter:" + strconv.Itoa(k) }

// writer writes to one instance. Its counts are its goroutine's until
// run returns; the move's window is set by the drain's watcher.
type writer struct {
	c    creds
	base time.Time // of the window's clock
	// from and to are the move's window, nanoseconds since base plus 1;
	// 0 while unknown.
	from, to atomic.Int64

	// started is set at the first acknowledgement.
	started atomic.Bool

	acked, failed      [writerCounters]int64 // INCRs, by counter
	xadds, xaddsFailed int64
	errs               int64 // failed commands
	firstErr           string
	gap                time.Duration // longest without an ack in the window
	firstAck, lastAck  time.Duration // since base; firstAck < 0 before one
}

// mark sets the window's start (to false) or end (to true) at now.
func (w *writer) mark(end bool) {
	t := int64(time.Since(w.base)) + 1
	if end {
		w.to.Store(t)
	} else {
		w.from.Store(t)
	}
}

// observe takes a gap without an acknowledgement from last to now (since
// base) if it overlaps the move's window.
func (w *writer) observe(last, now time.Duration) {
	from, to := w.from.Load(), w.to.Load()
	if from == 0 || int64(now)+1 < from || (to != 0 && int64(last)+1 > to) {
		return
	}
	w.gap = max(w.gap, now-last)
}

// dial is a client with one connection that fails fast: no retry of a
// command, one dial attempt (go-redis would otherwise back off between
// dials and, after failed ones, answer from its last error for a second).
func (w *writer) dial() *goredis.Client {
	return goredis.NewClient(&goredis.Options{Addr: w.c.addr(), Username: w.c.Username, Password: w.c.Password,
		DisableIdentity: true, MaxRetries: -1, PoolSize: 1, DialerRetries: 1,
		DialTimeout: time.Second, ReadTimeout: 5 * time.Second, WriteTimeout: 5 * time.Second,
		MaintNotificationsConfig: &maintnotifications.Config{Mode: maintnotifications.ModeDisabled}})
}

// run writes until stop is closed.
func (w *writer) run(stop <-chan struct{}) {
	ctx := context.Background()
	cl := w.dial()
	defer func() { cl.Close() }()
	w.firstAck = -1
	for i := 0; ; i++ {
		select {
		case <-stop:
			if w.firstAck >= 0 {
				w.observe(w.lastAck, time.Since(w.base))
			}
			return
		default:
		}
		k := i % (writerCounters + 1)
		var err error
		if k < writerCounters {
			err = cl.Incr(ctx, writerCounter(k)).Err()
		} else {
			err = cl.XAdd(ctx, &goredis.XAddArgs{Stream: writerStream, Values: []string{"i", strconv.Itoa(i)}}).Err()
		}
		now := time.Since(w.base)
		if err != nil {
			if k < writerCounters {
				w.failed[k]++
			} else {
				w.xaddsFailed++
			}
			w.errs++
			if w.firstErr == "" {
				w.firstErr = err.Error()
			}
			cl.Close()
			time.Sleep(writerRetry)
			cl = w.dial()
			continue
		}
		if k < writerCounters {
			w.acked[k]++
		} else {
			w.xadds++
		}
		if w.firstAck < 0 {
			w.firstAck = now
			w.started.Store(true)
		} else {
			w.observe(w.lastAck, now)
		}
		w.lastAck = now
		time.Sleep(writerEvery)
	}
}

// check reads the writer's counters and stream on the instance at addr
// (its new primary) and returns how many acknowledged writes it lacks and
// how many keys the writer made there. More than the writer attempted is
// corrupt data: an error.
func (w *writer) check(ctx context.Context, addr string) (lost int64, keys int64, err error) {
	cl := goredis.NewClient(&goredis.Options{Addr: addr, Username: w.c.Username, Password: w.c.Password,
		DisableIdentity: true, MaxRetries: -1, ReadTimeout: time.Minute})
	defer cl.Close()
	for k := range writerCounters {
		v, err := cl.Get(ctx, writerCounter(k)).Int64()
		switch {
		case errors.Is(err, goredis.Nil):
			v = 0
		case err != nil:
			return 0, 0, fmt.Errorf("GET %s: %w", writerCounter(k), err)
		default:
			keys++
		}
		if v > w.acked[k]+w.failed[k] {
			return 0, 0, fmt.Errorf("%s is %d, more than the %d INCRs sent", writerCounter(k), v, w.acked[k]+w.failed[k])
		}
		lost += max(w.acked[k]-v, 0)
	}
	n, err := cl.XLen(ctx, writerStream).Result()
	if err != nil {
		return 0, 0, fmt.Errorf("XLEN %s: %w", writerStream, err)
	}
	if n > 0 {
		keys++
	}
	if n > w.xadds+w.xaddsFailed {
		return 0, 0, fmt.Errorf("%s holds %d entries, more than the %d XADDs sent", writerStream, n, w.xadds+w.xaddsFailed)
	}
	lost += max(w.xadds-n, 0)
	return lost, keys, nil
}

// ackedAll is every write the writer had acknowledged.
func (w *writer) ackedAll() int64 {
	n := w.xadds
	for _, a := range w.acked {
		n += a
	}
	return n
}

// watchedDrain drains agent name through broker b while a writer per id
// (with its binding's credentials all[i], at their address) writes; it
// returns the drain's final status and the writers, stopped. Each
// writer's window is from when the drain status first names its instance
// as the current one to when it names another or ends; an instance it
// never names (a move shorter than a poll) gets the whole drain.
func (s *suite) watchedDrain(b *proc, name string, ids []string, all []creds) (broker.Drain, []*writer, error) {
	var dr broker.Drain
	base := time.Now()
	ws := make([]*writer, len(ids))
	byID := map[string]*writer{}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for i := range ids {
		ws[i] = &writer{c: all[i], base: base}
		byID[ids[i]] = ws[i]
		wg.Add(1)
		go func() { defer wg.Done(); ws[i].run(stop) }()
	}
	stopped := false
	halt := func() {
		if !stopped {
			close(stop)
			wg.Wait()
			stopped = true
		}
	}
	defer halt()
	// Every writer has had an acknowledgement before the drain starts.
	for t0 := time.Now(); ; time.Sleep(time.Millisecond) {
		ok := true
		for _, w := range ws {
			ok = ok && w.started.Load()
		}
		if ok {
			break
		}
		if time.Since(t0) > 10*time.Second {
			halt()
			for i, w := range ws {
				if w.firstAck < 0 {
					return dr, nil, fmt.Errorf("writer of %s: no write acknowledged in 10s: %d errors, first %s", ids[i], w.errs, w.firstErr)
				}
			}
		}
	}
	time.Sleep(100 * time.Millisecond)

	path := b.base + "/admin/agents/" + name + "/drain"
	if err := expect("POST drain of "+name, 202)(s.call("POST", path, "", admin)); err != nil {
		return dr, nil, err
	}
	seen := map[string]bool{}
	cur := ""
	for {
		code, body, err := s.call("GET", path, "", admin)
		if err := expect("GET drain of "+name, 200)(code, body, err); err != nil {
			return dr, nil, err
		}
		if err := json.Unmarshal(body, &dr); err != nil {
			return dr, nil, err
		}
		now := dr.Current
		if dr.State != broker.DrainRunning {
			now = ""
		}
		if now != cur {
			if w := byID[cur]; w != nil {
				w.mark(true)
			}
			if w := byID[now]; w != nil && !seen[now] {
				w.mark(false)
				seen[now] = true
			}
			cur = now
		}
		if dr.State != broker.DrainRunning {
			break
		}
		if time.Since(dr.StartedAt) > 10*time.Minute {
			return dr, nil, fmt.Errorf("drain of %s still running after 10m", name)
		}
		time.Sleep(2 * time.Millisecond)
	}
	for id, w := range byID {
		if !seen[id] {
			s.logf("  the drain status never named %s as current: its window is the whole drain", id)
			w.from.Store(1)
			w.mark(true)
		}
	}
	time.Sleep(100 * time.Millisecond) // every writer has answers after
	halt()
	for i, w := range ws {
		if w.errs > 0 {
			s.logf("  writer of %s: %d failed commands, the first: %s", ids[i], w.errs, w.firstErr)
		}
	}
	return dr, ws, nil
}

// newPrimary is where id serves after a move off src: the one agent
// other than src where it is a primary; src must hold a forwarder.
func (s *suite) newPrimary(f *brokerFleet, src *proc, id string) (instance, error) {
	var where []instance
	for _, a := range f.agents {
		code, body, err := s.call("GET", a.base+"/v1/instances/"+id, "", nil)
		if err != nil {
			return instance{}, err
		}
		var in instance
		if code != 200 || json.Unmarshal(body, &in) != nil {
			continue
		}
		switch {
		case a == src && in.State != apitype.StateForwarding:
			return instance{}, fmt.Errorf("after the move %s is %s on %s", id, in.State, src.name)
		case a != src && in.ReplicaOf == "":
			where = append(where, in)
		}
	}
	if len(where) != 1 {
		return instance{}, fmt.Errorf("after the move %s serves on %d agents", id, len(where))
	}
	return where[0], nil
}

func instanceAddr(in instance) string { return net.JoinHostPort(in.Host, strconv.Itoa(in.Port)) }

// infoStat reads one field of INFO section on the instance at addr as
// the binding user c.
func infoStat(ctx context.Context, addr string, c creds, section, field string) (int64, error) {
	cl := goredis.NewClient(&goredis.Options{Addr: addr, Username: c.Username, Password: c.Password,
		DisableIdentity: true, MaxRetries: -1})
	defer cl.Close()
	txt, err := cl.Info(ctx, section).Result()
	if err != nil {
		return 0, err
	}
	for _, l := range strings.Split(txt, "\n") {
		if v, ok := strings.CutPrefix(strings.TrimSpace(l), field+":"); ok {
			return strconv.ParseInt(v, 10, 64)
		}
	}
	return 0, fmt.Errorf("INFO %s has no %s", section, field)
}
