package agent

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/redis-agent/redis-agent/supervisor"
)

// metrics are the agent's own figures. Event counters and histograms are
// updated as things happen; everything else is read at scrape time from
// memory (supervisor status, the last reconcile) by collector, without
// I/O to any instance.
type metrics struct {
	restarts        *prometheus.CounterVec
	opDuration      *prometheus.HistogramVec
	reconcileSecs   prometheus.Gauge
	reconcileCounts *prometheus.GaugeVec
}

func newMetrics(reg prometheus.Registerer, s *Service) *metrics {
	m := &metrics{
		restarts: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "redis_agent_instance_restarts_total",
			Help: "Restarts of instances' redis-server processes, by instance and reason (crash, hung, unready, manual).",
		}, []string{"instance", "reason"}),
		opDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "redis_agent_operation_duration_seconds",
			Help:    "Duration of successful provision, deprovision and restart operations.",
			Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
		}, []string{"operation"}),
		reconcileSecs: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "redis_agent_reconcile_duration_seconds",
			Help: "Duration of the last reconcile at start.",
		}),
		reconcileCounts: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "redis_agent_reconcile_instances",
			Help: "What the last reconcile did, by outcome (adopted, started, deleted).",
		}, []string{"outcome"}),
	}
	if reg != nil {
		reg.MustRegister(m.restarts, m.opDuration, m.reconcileSecs, m.reconcileCounts, &collector{s: s})
	}
	return m
}

func (m *metrics) observe(op string, start time.Time) {
	m.opDuration.WithLabelValues(op).Observe(time.Since(start).Seconds())
}

// forget drops the per-instance series of a deleted instance.
func (m *metrics) forget(id string) {
	m.restarts.DeletePartialMatch(prometheus.Labels{"instance": id})
}

var (
	descInstances = prometheus.NewDesc("redis_agent_instances",
		"Instances by state.", []string{"state"}, nil)
	descOrphans = prometheus.NewDesc("redis_agent_orphans",
		"Directories and redis-server processes under the data root that no record owns, found by the last reconcile.", nil, nil)
	descPortsTotal = prometheus.NewDesc("redis_agent_ports_in_range",
		"Ports in the configured range.", nil, nil)
	descPortsAllocated = prometheus.NewDesc("redis_agent_ports_allocated",
		"Ports held by instance records.", nil, nil)
	descMemoryTotal = prometheus.NewDesc("redis_agent_memory_budget_bytes",
		"Memory budget the agent hands out as maxmemory.", nil, nil)
	descMemoryReserved = prometheus.NewDesc("redis_agent_memory_reserved_bytes",
		"Memory budget reserved by instances.", nil, nil)
)

// collector reads the agent's state at scrape time.
type collector struct{ s *Service }

func (c *collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{descInstances, descOrphans, descPortsTotal, descPortsAllocated, descMemoryTotal, descMemoryReserved} {
		ch <- d
	}
}

func (c *collector) Collect(ch chan<- prometheus.Metric) {
	s := c.s
	counts := map[string]float64{}
	for st := supervisor.Starting; st <= supervisor.Stopped; st++ {
		counts[st.String()] = 0
	}
	s.mu.Lock()
	for _, in := range s.instances {
		counts[in.sup.Status().State.String()]++
	}
	s.mu.Unlock()
	for st, n := range counts {
		ch <- prometheus.MustNewConstMetric(descInstances, prometheus.GaugeValue, n, st)
	}
	var orphans int
	if p := s.orphans.Load(); p != nil {
		orphans = len(*p)
	}
	ch <- prometheus.MustNewConstMetric(descOrphans, prometheus.GaugeValue, float64(orphans))
	ch <- prometheus.MustNewConstMetric(descPortsTotal, prometheus.GaugeValue, float64(s.cfg.PortMax-s.cfg.PortMin+1))
	ch <- prometheus.MustNewConstMetric(descMemoryTotal, prometheus.GaugeValue, float64(s.cfg.MemoryBudgetMB)*(1<<20))
	if u, err := s.store.Usage(); err == nil {
		ch <- prometheus.MustNewConstMetric(descPortsAllocated, prometheus.GaugeValue, float64(u.Instances))
		ch <- prometheus.MustNewConstMetric(descMemoryReserved, prometheus.GaugeValue, float64(u.MemoryMB)*(1<<20))
	}
}
