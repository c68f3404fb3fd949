package agent

import (
	"context"
	"fmt"

	"github.com/redis-agent/redis-agent/apitype"
	"github.com/redis-agent/redis-agent/limits"
	"github.com/redis-agent/redis-agent/state"
)

// IO limits: every instance's redis-server (and its BGSAVE and AOF
// rewrite children, and a restore's candidate) is throttled on the block
// device of the data directory, with the agent's defaults (Config.IO*)
// where the instance's own setting (state.Instance.IO) sets nothing.

// initIO resolves the data directory's block device and says, once, what
// IO limits can and cannot do on this host.
func (s *Service) initIO() {
	dev, err := limits.DeviceOf(s.layout.DataRoot)
	if err != nil {
		dev = limits.Device{Note: "cannot resolve the data directory's device: " + err.Error()}
	}
	s.dev = dev
	ok, why := s.cg.IOSupported()
	switch {
	case !ok:
		s.ioNote = "IO limits are not enforced: " + why
	case dev.ID == "":
		s.ioNote = "IO limits are not enforced: " + dev.Note
	}
	if s.ioNote != "" {
		s.log.Warn(s.ioNote, "dir", s.layout.DataRoot)
		return
	}
	s.log.Info("IO limits on the data directory's device", "device", dev.ID, "name", dev.Name, "scheduler", dev.Scheduler,
		"read_bps", s.cfg.IOReadBPS, "write_bps", s.cfg.IOWriteBPS, "read_iops", s.cfg.IOReadIOPS, "write_iops", s.cfg.IOWriteIOPS, "weight", s.cfg.IOWeight)
	if dev.Note != "" {
		s.log.Info("IO limits: " + dev.Note)
	}
	if s.cfg.IOWeight > 0 && !dev.Weighted() {
		s.log.Warn(s.weightNote())
	}
}

// weightNote says why a weight does nothing on the data device.
func (s *Service) weightNote() string {
	sch := s.dev.Scheduler
	if sch == "" {
		sch = "none (a bio-based device)"
	}
	return fmt.Sprintf("IO weights have no effect on %s, whose scheduler is %s: only BFQ shares a device by weight (echo bfq > /sys/block/%s/queue/scheduler where it is a disk)",
		s.dev.Name, sch, s.dev.Name)
}

// effectiveIO is the setting in force for an instance whose own setting
// is set (nil: none): each field it sets, else the agent's default.
func (s *Service) effectiveIO(set *apitype.IOSetting) apitype.IOLimits {
	pick := func(own *int64, def int64) int64 {
		if own != nil {
			return *own
		}
		return def
	}
	var own apitype.IOSetting
	if set != nil {
		own = *set
	}
	return apitype.IOLimits{
		ReadBPS:   pick(own.ReadBPS, s.cfg.IOReadBPS),
		WriteBPS:  pick(own.WriteBPS, s.cfg.IOWriteBPS),
		ReadIOPS:  pick(own.ReadIOPS, s.cfg.IOReadIOPS),
		WriteIOPS: pick(own.WriteIOPS, s.cfg.IOWriteIOPS),
		Weight:    pick(own.Weight, s.cfg.IOWeight),
	}
}

// ioFor is the cgroup's IO limits of an instance with setting set.
func (s *Service) ioFor(set *apitype.IOSetting) limits.IO {
	if s.dev.ID == "" {
		return limits.IO{}
	}
	e := s.effectiveIO(set)
	return limits.IO{Device: s.dev.ID, ReadBPS: uint64(e.ReadBPS), WriteBPS: uint64(e.WriteBPS),
		ReadIOPS: uint64(e.ReadIOPS), WriteIOPS: uint64(e.WriteIOPS), Weight: uint64(e.Weight)}
}

// ioView is the IO limits the API shows for an instance with setting set.
func (s *Service) ioView(set *apitype.IOSetting) *apitype.IOLimits {
	v := s.effectiveIO(set)
	v.Device, v.Setting = s.dev.ID, set
	switch {
	case s.ioNote != "":
		v.Note = s.ioNote
	case v.Weight > 0 && !s.dev.Weighted():
		v.Note = s.weightNote()
	}
	return &v
}

// checkIO checks one IO limit of a setting or of the agent's defaults.
func checkIO(name string, v int64) error {
	switch {
	case name == "weight" && (v < 0 || v > apitype.MaxIOWeight):
		return fmt.Errorf("io %s %d: %w: want 1 to %d, or 0 for the default", name, v, ErrInvalid, apitype.MaxIOWeight)
	case name == "weight":
	case v < 0:
		return fmt.Errorf("io %s %d: %w: want a positive number, or 0 for no limit", name, v, ErrInvalid)
	case v == 0:
	case (name == "read_bps" || name == "write_bps") && v < apitype.MinIOBPS:
		return fmt.Errorf("io %s %d: %w: want at least %d bytes a second (1 MiB/s), or 0 for no limit", name, v, ErrInvalid, apitype.MinIOBPS)
	case (name == "read_iops" || name == "write_iops") && v < apitype.MinIOPS:
		return fmt.Errorf("io %s %d: %w: want at least %d operations a second, or 0 for no limit", name, v, ErrInvalid, apitype.MinIOPS)
	}
	return nil
}

// normalizeIO checks an instance's IO setting and returns it, nil when it
// sets nothing.
func normalizeIO(set *apitype.IOSetting) (*apitype.IOSetting, error) {
	if set == nil {
		return nil, nil
	}
	empty := true
	for _, f := range []struct {
		name string
		v    *int64
	}{{"read_bps", set.ReadBPS}, {"write_bps", set.WriteBPS}, {"read_iops", set.ReadIOPS}, {"write_iops", set.WriteIOPS}, {"weight", set.Weight}} {
		if f.v == nil {
			continue
		}
		empty = false
		if err := checkIO(f.name, *f.v); err != nil {
			return nil, err
		}
	}
	if empty {
		return nil, nil
	}
	c := *set
	return &c, nil
}

// CheckIO checks an IO setting as SetIO and a provision would (an error
// wraps ErrInvalid), so that a request can be refused before anything
// changes.
func CheckIO(set apitype.IOSetting) error {
	_, err := normalizeIO(&set)
	return err
}

// sameIO reports whether two settings set the same fields to the same
// values.
func sameIO(a, b *apitype.IOSetting) bool {
	if a == nil || b == nil {
		return a == nil && b == nil
	}
	eq := func(x, y *int64) bool { return (x == nil && y == nil) || (x != nil && y != nil && *x == *y) }
	return eq(a.ReadBPS, b.ReadBPS) && eq(a.WriteBPS, b.WriteBPS) && eq(a.ReadIOPS, b.ReadIOPS) &&
		eq(a.WriteIOPS, b.WriteIOPS) && eq(a.Weight, b.Weight)
}

// SetIO replaces the IO setting of instance id (an empty one is the
// agent's defaults again) and applies it to its running processes at
// once: no restart.
func (s *Service) SetIO(ctx context.Context, id string, set apitype.IOSetting) (Instance, error) {
	if err := validateID("instance", id); err != nil {
		return Instance{}, err
	}
	io, err := normalizeIO(&set)
	if err != nil {
		return Instance{}, err
	}
	unlock := s.locks.lock(id)
	defer unlock()
	rec, err := s.updateActive(id, func(r *state.Instance) error {
		r.IO = io
		return nil
	})
	if err != nil {
		return Instance{}, err
	}
	if in := s.runtime(id); in != nil {
		in.io.Store(io)
		s.confine(id, in.sup.Status().Process.PID)
	}
	s.log.Info("IO limits set", "instance", id, "limits", fmt.Sprintf("%+v", s.effectiveIO(io)))
	return s.view(rec), nil
}
