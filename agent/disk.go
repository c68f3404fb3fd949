package agent

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/state"
)

// Disk: what each instance's files take, measured in the background
// every Config.DiskInterval (never at a scrape or a GET); what each may
// take, its reservation, from its maxmemory and persistence; and the
// data file system's budget, which a provision or a resize must fit.

// diskUsage is one measure of an instance's files.
type diskUsage struct {
	// data is what the instance directory takes (data, config, a
	// restore's staging), log its log and the rotated ones: allocated
	// bytes, as du counts them.
	data, log int64
	at        time.Time
	// reserved is the instance's reservation when it was measured (what
	// the budget counts), reservedData its data part; quota its project
	// quota's limit (0: none).
	reserved, reservedData, quota int64
}

// used is what u counts against the data file system.
func (s *Service) used(u diskUsage) int64 {
	if s.logOnDataFS {
		return u.data + u.log
	}
	return u.data
}

// diskState holds the last measure of every instance.
type diskState struct {
	mu    sync.Mutex
	usage map[string]diskUsage
}

func (d *diskState) get(id string) (diskUsage, bool) {
	d.mu.Lock()
	defer d.mu.Unlock()
	u, ok := d.usage[id]
	return u, ok
}

func (d *diskState) set(id string, u diskUsage) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.usage == nil {
		d.usage = map[string]diskUsage{}
	}
	d.usage[id] = u
}

func (d *diskState) forget(id string) {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.usage, id)
}

// all returns a copy of every measure.
func (d *diskState) all() map[string]diskUsage {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := make(map[string]diskUsage, len(d.usage))
	for id, u := range d.usage {
		out[id] = u
	}
	return out
}

// dirOverhead is what an instance directory takes besides its data: the
// directories, the config and the ACL file (a few blocks), rounded up.
const dirOverhead = 1 << 20

// dataReservation is what an instance's directory may take: its files'
// worst case and the directory's own.
func dataReservation(memoryMB int, persistence string) int64 {
	return apitype.DataFilesBytes(memoryMB, persistence) + dirOverhead
}

// reservation is the disk an instance of memoryMB and persistence may
// take on the data file system: its directory's, and its logs' bound
// when they are on the same file system.
func (s *Service) reservation(memoryMB int, persistence string) int64 {
	r := dataReservation(memoryMB, persistence)
	if s.logOnDataFS {
		r += s.logBound()
	}
	return r
}

// logBound is the most an instance's logs take: the live one up to
// LogMaxBytes (checked every DiskInterval) and LogKeep rotated ones.
func (s *Service) logBound() int64 {
	if s.cfg.LogMaxBytes <= 0 {
		return 0
	}
	return s.cfg.LogMaxBytes * int64(s.cfg.LogKeep+1)
}

// sameFS reports whether two directories are on one file system.
func sameFS(a, b string) bool {
	var sa, sb unix.Stat_t
	if unix.Stat(a, &sa) != nil || unix.Stat(b, &sb) != nil {
		return true
	}
	return sa.Dev == sb.Dev
}

// du returns the bytes allocated to path and everything under it, as
// du(1) counts them (st_blocks, a hard-linked file once). What does not
// exist takes nothing.
func du(path string) (int64, error) {
	seen := map[[2]uint64]bool{}
	var total int64
	err := filepath.WalkDir(path, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil // removed while walked
			}
			return err
		}
		info, err := d.Info()
		if err != nil {
			if errors.Is(err, fs.ErrNotExist) {
				return nil
			}
			return err
		}
		st, ok := info.Sys().(*syscall.Stat_t)
		if !ok {
			return nil
		}
		if st.Nlink > 1 && !d.IsDir() {
			key := [2]uint64{st.Dev, st.Ino}
			if seen[key] {
				return nil
			}
			seen[key] = true
		}
		total += st.Blocks * 512
		return nil
	})
	return total, err
}

// measure finds what the files of rec's instance take now.
func (s *Service) measure(rec state.Instance) diskUsage {
	id := rec.ID
	u := diskUsage{at: time.Now(), reserved: s.reservation(rec.MemoryMB, rec.Persistence), reservedData: dataReservation(rec.MemoryMB, rec.Persistence)}
	var err error
	// A project quota counts the directory's blocks already: one call,
	// no walk.
	if p := project(rec); s.quota != nil && p != 0 {
		if used, limit, err := s.quota.Usage(p); err == nil && limit > 0 {
			u.data, u.quota = used, limit
		}
	}
	if u.quota == 0 {
		if u.data, err = du(s.layout.Dir(id)); err != nil {
			s.log.Debug("measure an instance's directory", "instance", id, "err", err)
		}
	}
	for _, f := range s.layout.LogFiles(id) {
		n, _ := du(f)
		u.log += n
	}
	s.disk.set(id, u)
	return u
}

// diskLoop measures every instance's files every DiskInterval, from the
// first round at once.
func (s *Service) diskLoop(ctx context.Context) {
	t := time.NewTicker(s.cfg.DiskInterval)
	defer t.Stop()
	for {
		s.diskRound()
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// diskRound is one round of the disk loop.
func (s *Service) diskRound() {
	recs, err := s.store.List()
	if err != nil {
		return
	}
	live := make(map[string]bool, len(recs))
	for _, rec := range recs {
		live[rec.ID] = true
		s.rotateLog(rec.ID)
		s.measure(rec)
	}
	for id := range s.disk.all() {
		if !live[id] {
			s.disk.forget(id)
		}
	}
}

// rotateLog rotates the log of id once it is past LogMaxBytes (a stat,
// and the id's lock only then, so that a delete does not race it).
func (s *Service) rotateLog(id string) {
	if s.cfg.LogMaxBytes <= 0 {
		return
	}
	if st, err := os.Stat(s.layout.LogPath(id)); err != nil || st.Size() <= s.cfg.LogMaxBytes {
		return
	}
	unlock := s.locks.lock(id)
	defer unlock()
	rec, err := s.store.Get(id)
	if err != nil || rec.Phase == state.PhaseDeleting {
		return
	}
	rotated, err := s.layout.RotateLog(id, s.cfg.LogMaxBytes, s.cfg.LogKeep, s.ownerOf(rec))
	if err != nil {
		s.log.Warn("rotate an instance's log", "instance", id, "err", err)
	} else if rotated {
		s.log.Info("rotated an instance's log", "instance", id, "max_bytes", s.cfg.LogMaxBytes, "kept", s.cfg.LogKeep)
	}
}

// diskView is the disk an instance's files take and may take.
func (s *Service) diskView(rec state.Instance) *apitype.DiskUsage {
	v := &apitype.DiskUsage{ReservedBytes: s.reservation(rec.MemoryMB, rec.Persistence)}
	if u, ok := s.disk.get(rec.ID); ok {
		v.DataBytes, v.LogBytes, v.QuotaBytes, v.MeasuredAt = u.data, u.log, u.quota, u.at.UTC()
	}
	return v
}

// budget is the data file system's room.
type budget struct {
	total, free int64 // the file system's size, what an unprivileged user may still write
	reserved    int64 // the instances' reservations, summed
	used        int64 // what their files take (the last measures)
	// available is free minus what the instances may still grow into
	// (each reservation beyond its use) and the headroom.
	available int64
}

// diskBudget computes the budget over the instances that exist (their
// records' shares, read from the store's indexes).
func (s *Service) diskBudget() (budget, error) {
	recs, err := s.store.Shares()
	if err != nil {
		return budget{}, err
	}
	usage := s.disk.all()
	shares := make([]diskUsage, len(recs))
	for i, rec := range recs {
		shares[i] = usage[rec.ID]
		shares[i].reserved = s.reservation(rec.MemoryMB, rec.Persistence)
	}
	return s.budgetOf(shares)
}

// budgetOf computes the budget of instances whose reservations and last
// measures are shares.
func (s *Service) budgetOf(shares []diskUsage) (budget, error) {
	var st unix.Statfs_t
	statfs := s.statfs
	if statfs == nil {
		statfs = unix.Statfs
	}
	if err := statfs(s.layout.DataRoot, &st); err != nil {
		return budget{}, fmt.Errorf("statfs %s: %w", s.layout.DataRoot, err)
	}
	b := budget{total: int64(st.Blocks) * st.Bsize, free: int64(st.Bavail) * st.Bsize}
	var growth int64
	for _, u := range shares {
		used := s.used(u)
		b.reserved += u.reserved
		b.used += used
		growth += max(u.reserved-used, 0)
	}
	b.available = max(b.free-growth-s.cfg.DiskHeadroomMB<<20, 0)
	return b, nil
}

// admitDisk refuses (ErrCapacity) a reservation of need more bytes that
// the data file system's budget has no room for. The caller holds
// admitMu until the reservation is recorded, so two admissions never
// count the same room.
func (s *Service) admitDisk(need int64, what string) error {
	if need <= 0 || s.cfg.DiskBudget == "off" {
		return nil
	}
	b, err := s.diskBudget()
	if err != nil {
		return err
	}
	if need > b.available {
		return fmt.Errorf("%s needs %s of disk and %s are available on %s (%s free, less what the instances may still grow into and %d MiB of headroom): %w",
			what, mib(need), mib(b.available), s.layout.DataRoot, mib(b.free), s.cfg.DiskHeadroomMB, ErrCapacity)
	}
	return nil
}

func mib(n int64) string { return fmt.Sprintf("%.1f MiB", float64(n)/(1<<20)) }
