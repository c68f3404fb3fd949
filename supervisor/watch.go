package supervisor

import (
	"errors"
	"os"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// exitWatch closes C when the watched process exits. It works for children
// and for adopted processes alike: a pidfd becomes readable when its process
// exits, and it is waited on through the runtime's netpoller, so a thousand
// watched processes cost a thousand parked goroutines, not a thousand
// threads blocked in wait.
type exitWatch struct {
	C    chan struct{}
	stop func()
}

// Stop ends the watch without closing C.
func (w *exitWatch) Stop() { w.stop() }

// pollInterval is used only on kernels without pidfd_open (before 5.3).
const pollInterval = 250 * time.Millisecond

// watchExit starts watching p. If p is already gone, C is closed at once.
func watchExit(p Process) *exitWatch {
	w := &exitWatch{C: make(chan struct{})}
	fd, err := unix.PidfdOpen(p.PID, unix.PIDFD_NONBLOCK)
	if errors.Is(err, syscall.ESRCH) {
		close(w.C)
		w.stop = func() {}
		return w
	}
	if err != nil {
		return pollExit(p, w)
	}
	// The pidfd names the process, not the pid: if the pid was reused
	// before we opened it, the start time no longer matches.
	if cur, err := identify(p.PID); err != nil || cur.StartTime != p.StartTime {
		unix.Close(fd)
		close(w.C)
		w.stop = func() {}
		return w
	}
	f := os.NewFile(uintptr(fd), "pidfd")
	rc, err := f.SyscallConn()
	if err != nil {
		f.Close()
		return pollExit(p, w)
	}
	var once sync.Once
	w.stop = func() { once.Do(func() { f.Close() }) }
	go func() {
		err := rc.Read(func(fd uintptr) bool {
			pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
			n, _ := unix.Poll(pfd, 0)
			return n > 0
		})
		if err == nil {
			close(w.C)
			w.stop()
		}
	}()
	return w
}

// pollExit is the fallback for kernels without pidfd: it looks at /proc.
func pollExit(p Process, w *exitWatch) *exitWatch {
	quit := make(chan struct{})
	var once sync.Once
	w.stop = func() { once.Do(func() { close(quit) }) }
	go func() {
		t := time.NewTicker(pollInterval)
		defer t.Stop()
		for {
			select {
			case <-quit:
				return
			case <-t.C:
				if cur, err := identify(p.PID); err != nil || cur.StartTime != p.StartTime {
					close(w.C)
					return
				}
			}
		}
	}()
	return w
}
